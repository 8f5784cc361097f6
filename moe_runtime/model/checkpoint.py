"""Load a local Hugging Face MoE checkpoint (safetensors only) into a Transformer and a HostExpertStore.

Contract: ``load_model(path, device, dtype=None) -> (model, store)``.

- ``path`` is a directory with ``config.json`` and either ``model.safetensors``
  or ``model.safetensors.index.json`` plus its shards. Files are memory-mapped
  with ``safe_open``; nothing is unpickled.
- Dense weights (embeddings, attention, norms, routers, dense and shared MLPs,
  lm_head) go to ``device``; each routed expert is copied straight from the
  mapped file into its flat host buffer in the store, so experts are never all
  on the device (a checkpoint larger than device memory loads). Wrap the store
  in ``ResidentExperts`` or a cache to run the model.
- ``dtype=None`` keeps the checkpoint's dtype (of its embedding table);
  otherwise every tensor is converted to ``dtype`` (DeepSeek-V3's
  ``e_score_correction_bias`` stays float32, as in transformers).
- ``expert_dtype`` picks the experts' format (formats.py): ``auto`` keeps the
  checkpoint's (MXFP4 stays MXFP4; float experts take the compute dtype);
  ``float32``/``bfloat16``/``float16`` store them so, ``int8``/``int4``
  quantize them group-wise once, here (from the dequantized weights when the
  checkpoint is MXFP4). The store holds them packed; the model computes them
  in ``dtype``.
- Tensor names come from the family's ``TensorNames`` (families.py). Expert
  tensors may be in the classic per-expert layout (e.g. mixtral
  ``block_sparse_moe.experts.{e}.w1/w2/w3``; qwen/olmoe
  ``mlp.experts.{e}.gate_proj/up_proj/down_proj``), which transformers 5.23
  still writes with save_pretrained, or the fused layout of transformers 5's
  modules (``mlp.experts.gate_up_proj`` [E, 2I, H], gate rows first, and
  ``mlp.experts.down_proj`` [E, H, I]). GPT-OSS's are fused and transposed
  (``gate_up_proj`` [E, H, 2I] with gate and up columns interleaved, plus
  ``gate_up_proj_bias``/``down_proj_bias``), or MXFP4 (``*_blocks`` [E, out,
  in/32, 16] and ``*_scales`` [E, out, in/32] uint8, ``quantization_config``
  ``quant_method: mxfp4``), loaded as stored. Tensors the model does not use
  (DeepSeek-V3's multi-token-prediction layer ``model.layers.{N}.*``) are
  ignored.
- Any missing or unreadable file, missing or mis-shaped tensor, tensor with a
  NaN or inf, or bad config raises ``MoeError`` naming it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from moe_runtime.core.hf_fields import read_dtype_name
from moe_runtime.core.model_config import ModelConfig, load_config, read_json
from moe_runtime.core.config_files import input_file, name_inside
from moe_runtime.core.errors import MoeError
from moe_runtime.model.experts import HostExpertStore
from moe_runtime.core.families import TensorNames
from moe_runtime.core.format_sizes import EXPERT_DTYPES
from moe_runtime.model.formats import DenseExpert, ExpertFormat, Mxfp4Matrix, all_finite, format_for
from moe_runtime.model.transformer import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def check_model_dir(path) -> Path:
    """``path`` as a checkpoint folder; one MoeError line when it is missing, not a folder, or has no
    config.json (every command says the same, before any work)."""
    p = Path(path)
    if not p.exists():
        raise MoeError(f"model directory not found: {path}")
    if not p.is_dir():
        raise MoeError(f"--model {path} is a file, not a checkpoint directory (config.json + safetensors)")
    if not os.path.lexists(p / "config.json"):  # one that is there but unreadable is config.json's own error
        raise MoeError(f"missing file {p / 'config.json'}: --model {path} is not a Hugging Face checkpoint "
                       "directory")
    return p


class SafetensorsReader:
    """Memory-mapped read access to the tensors of one checkpoint directory, by name."""

    def __init__(self, model_dir: str | Path, check_finite: bool = True):
        """``check_finite``: refuse a tensor holding NaN or inf as it is read (one pass over it)."""
        self.dir = check_model_dir(model_dir)
        self.check_finite = check_finite
        single, index = self.dir / "model.safetensors", self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                assert isinstance(weight_map, dict)
            except (OSError, ValueError, KeyError, TypeError, AssertionError):
                raise MoeError(f"cannot parse {index}: expected a JSON object with a 'weight_map'") from None
        elif single.is_file():
            weight_map = None
        else:
            raise MoeError(f"no model.safetensors or model.safetensors.index.json in {self.dir}")
        files = sorted(set(weight_map.values())) if weight_map else [single.name]
        for name in files:  # names from data: inside this folder only (a lexical check, symlinks allowed)
            name_inside(name, f"{index.name}: weight_map entry")
        self._handles = {}
        for name in files:
            p = self.dir / name
            if not p.is_file() and not p.is_symlink() and not p.exists():
                raise MoeError(f"missing checkpoint shard: {p}")
            input_file(p, "checkpoint shard")  # a FIFO or directory: one line, never a blocked open
            try:
                self._handles[name] = safe_open(str(p), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:  # RuntimeError: mmap refused
                raise MoeError(f"cannot read safetensors file {p}: {' '.join(str(e).split())[:300]}") from None
        # tensor name -> file; trust the files over the index, which may be stale
        self._where = {k: name for name, f in self._handles.items() for k in f.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._slice(name).get_dtype()
        if code not in SAFETENSORS_DTYPES:
            raise MoeError(f"checkpoint tensor {name} has dtype {code}; supported: F32, BF16, F16")
        return SAFETENSORS_DTYPES[code]

    def get(self, name: str, shape: tuple[int, ...], index: int | None = None, raw: bool = False) -> Tensor:
        """Tensor ``name`` (or its row ``index`` for stacked expert tensors), checked against ``shape``;
        ``raw``: a U8 tensor (MXFP4 blocks and scales) instead of a float one."""
        full = self.shape(name)
        code = self._slice(name).get_dtype()
        if raw and code != "U8":
            raise MoeError(f"checkpoint tensor {name} has dtype {code}; MXFP4 blocks and scales are U8")
        if not raw and code not in SAFETENSORS_DTYPES:
            raise MoeError(f"checkpoint tensor {name} has dtype {code}; supported: F32, BF16, F16")
        want = shape if index is None else None
        if index is not None:
            if len(full) != len(shape) + 1 or full[1:] != tuple(shape) or index >= full[0]:
                raise MoeError(f"checkpoint tensor {name} has shape {list(full)}, expected "
                               f"[>{index}, {', '.join(map(str, shape))}]")
        elif full != tuple(want):
            raise MoeError(f"checkpoint tensor {name} has shape {list(full)}, expected {list(want)}")
        try:
            sl = self._slice(name)
            t = sl[index] if index is not None else sl[:]
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise MoeError(f"cannot read tensor {name} from {self._where[name]}: {e}") from None
        # garbage in would be garbage out with exit 0
        if not raw and self.check_finite and t.is_floating_point() and not all_finite(t):
            raise MoeError(f"checkpoint tensor {name}{'' if index is None else f' [{index}]'} holds non-finite "
                           f"values (NaN or inf)")
        return t

    def _slice(self, name: str):
        if name not in self._where:
            raise MoeError(f"checkpoint is missing tensor {name}")
        return self._handles[self._where[name]].get_slice(name)


def _hf_name(names: TensorNames, reader: SafetensorsReader, name: str) -> str:
    """Checkpoint name of one of our dense parameters: ours plus ``model.``, else the family's alias."""
    hf = names.dense(name)
    return hf if hf in reader else names.dense(name, classic=True)


def _load_experts(cfg: ModelConfig, reader: SafetensorsReader, store: HostExpertStore) -> None:
    """Pack every routed expert from the mapped files into its flat host buffer."""
    for m in range(len(cfg.moe_layers)):
        load_layer_experts(cfg, reader, m, store.layer_buffer(m), store.layout)


def load_layer_experts(cfg: ModelConfig, reader: SafetensorsReader, m: int, out: Tensor, layout: ExpertFormat) -> None:
    """Pack MoE layer ``m``'s experts into ``out`` [E, numel] (one layer at a time: ``moe-runtime pack``)."""
    for e in range(cfg.n_experts):
        layout.pack(out[e], read_expert(cfg, reader, m, e))


def read_expert(cfg: ModelConfig, reader: SafetensorsReader, m: int, e: int) -> DenseExpert:
    """Expert ``e`` of MoE layer ``m`` as the checkpoint stores it (float matrices, or MXFP4 as stored)."""
    h, i, names = cfg.hidden_size, cfg.moe_intermediate_size, cfg.family.names
    layer = cfg.moe_layers[m]
    if names.interleaved_gate_up:  # GPT-OSS: fused, transposed, gate/up interleaved (and biased)
        gate_up, down = names.fused(layer)
        b13 = b2 = None
        if cfg.expert_biases:
            b13 = reader.get(gate_up + "_bias", (2 * i,), index=e)  # [2I], gate and up interleaved
            b2 = reader.get(down + "_bias", (h,), index=e)  # [H]
        b1, b3 = (None, None) if b13 is None else (b13[0::2], b13[1::2])
        if cfg.quantization == "mxfp4":
            gu = Mxfp4Matrix(reader.get(gate_up + "_blocks", (2 * i, h // 32, 16), index=e, raw=True),
                             reader.get(gate_up + "_scales", (2 * i, h // 32), index=e, raw=True))  # rows: out
            d = Mxfp4Matrix(reader.get(down + "_blocks", (h, i // 32, 16), index=e, raw=True),
                            reader.get(down + "_scales", (h, i // 32), index=e, raw=True))
            w1, w3 = Mxfp4Matrix(gu.blocks[0::2], gu.scales[0::2]), Mxfp4Matrix(gu.blocks[1::2], gu.scales[1::2])
            return DenseExpert(w1, w3, d, b1, b3, b2)
        w13 = reader.get(gate_up, (h, 2 * i), index=e).t()  # [2I, H], gate and up rows interleaved
        w2 = reader.get(down, (i, h), index=e).t()  # [H, I]
        return DenseExpert(w13[0::2], w13[1::2], w2, b1, b3, b2)
    fused = next((f for f in (names.fused(layer, b) for b in names.fused_blocks) if f[0] in reader), None)
    if fused is not None:
        gate_up = reader.get(fused[0], (2 * i, h), index=e)  # [2I, H], gate rows first
        return DenseExpert(gate_up[:i], gate_up[i:], reader.get(fused[1], (h, i), index=e))  # w2 [H, I]
    n1, n3, n2 = names.per_expert(layer, e)
    return DenseExpert(reader.get(n1, (i, h)), reader.get(n3, (i, h)), reader.get(n2, (h, i)))


def expert_format(cfg: ModelConfig, expert_dtype: str | None, dtype: torch.dtype) -> ExpertFormat:
    """The format the experts are kept in (see the module docstring) for compute dtype ``dtype``."""
    if expert_dtype not in (None, *EXPERT_DTYPES):
        raise MoeError(f"unsupported expert dtype {expert_dtype!r} (choose {', '.join(EXPERT_DTYPES)})")
    if expert_dtype in (None, "auto"):
        codec = "mxfp4" if cfg.quantization == "mxfp4" else str(dtype).removeprefix("torch.")
    else:
        codec = expert_dtype
    return format_for(cfg, codec, dtype)


MODULE_BYTES = 64 << 10  # host memory of one decoder layer's Python modules, built before any weight


def model_bytes(cfg: ModelConfig, itemsize: int) -> tuple[int, int]:
    """(dense bytes, expert bytes) the weights of ``cfg`` take at ``itemsize`` bytes per element, from
    config.json's sizes alone (no allocation), on the large side; dense includes the layers' modules."""
    h, L = cfg.hidden_size, cfg.n_layers
    q = max(cfg.n_heads * cfg.head_dim, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim))
    kv = max(2 * cfg.n_kv_heads * cfg.head_dim, cfg.kv_lora_rank + cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim))
    attn = h * (2 * q + kv) + cfg.q_lora_rank * (h + q)
    moe = cfg.n_moe_layers
    dense = (cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2) + L * (attn + 2 * h)
             + moe * (h * cfg.n_experts + 3 * h * cfg.shared_expert_intermediate_size)
             + (L - moe) * 3 * h * cfg.dense_intermediate_size)
    experts = moe * cfg.n_experts * 3 * h * cfg.moe_intermediate_size
    return dense * itemsize + L * MODULE_BYTES, experts * itemsize


def check_model_fits(path, cfg: ModelConfig, itemsize: int, device, load_experts: bool) -> None:
    """Refuse (MoeError with the numbers) a model whose declared sizes exceed the memory this process may use,
    before anything is built: ``num_hidden_layers: 1000000000`` is an error in a second, not an OOM kill."""
    from moe_runtime.core.resources import check_fits

    dense, experts = model_bytes(cfg, itemsize)
    what = f"{path} ({cfg.n_layers:,} layers of hidden size {cfg.hidden_size:,}, as config.json declares)"
    if torch.device(device).type == "cpu":
        check_fits(what, dense + (experts if load_experts else 0))
    else:
        check_fits(what, dense, device)
        check_fits(f"the experts of {what}", experts if load_experts else 0)


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               load_experts: bool = True, expert_dtype: str | None = None,
               check_finite: bool = True) -> tuple[Transformer, HostExpertStore]:
    """Load config and weights; dense weights on ``device``, experts in a host store. See module docstring.

    ``load_experts=False`` leaves the experts on storage: the store then describes them but holds none
    (the disk tier reads them into slots itself). ``check_finite=False`` skips the NaN/inf check of
    every tensor (one pass over the weights as they load) for trusted files."""
    path = check_model_dir(path)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MoeError("device cuda requested but CUDA is not available")
    cfg = load_config(path)
    named = read_dtype_name(read_json(path / "config.json"))  # before the files are mapped: their sizes are
    itemsize = (dtype.itemsize if dtype is not None else DTYPES[named].itemsize if named in DTYPES else 4)
    check_model_fits(path, cfg, itemsize, device, load_experts)  # declared in config.json, on the large side
    reader = SafetensorsReader(path, check_finite)
    if dtype is None:
        dtype = reader.dtype("model.embed_tokens.weight")
    with torch.device("meta"):
        model = Transformer(cfg)
    state = {}
    for name, p in model.state_dict().items():
        t = reader.get(_hf_name(cfg.family.names, reader, name), tuple(p.shape))
        keep32 = name.endswith("e_score_correction_bias")  # transformers keeps it float32 in any dtype
        state[name] = t.to(device=device, dtype=torch.float32 if keep32 else dtype)
    model.load_state_dict(state, assign=True, strict=True)
    model.eval().requires_grad_(False)
    model.expert_format = expert_format(cfg, expert_dtype, dtype)
    store = HostExpertStore(model.expert_format, cfg.n_experts, cfg.top_k, cfg.moe_layers, allocate=load_experts)
    if load_experts:
        _load_experts(cfg, reader, store)
    return model, store


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``auto``/None -> None (checkpoint dtype); ``float32``/``bfloat16``/``float16`` -> torch dtype."""
    if name in (None, "auto"):
        return None
    if name not in DTYPES:
        raise MoeError(f"unsupported dtype {name!r} (choose auto, {', '.join(DTYPES)})")
    return DTYPES[name]


def checkpoint_dtype(model_dir, flag: str | None) -> torch.dtype:
    """The compute dtype: ``flag`` (``--dtype``), else config.json's, else the safetensors header's (no weight
    is read)."""
    named = read_json(Path(model_dir) / "config.json")
    named = named.get("torch_dtype") or named.get("dtype")
    dtype = parse_dtype(flag) or (DTYPES[named] if named in DTYPES else None)
    return dtype or SafetensorsReader(model_dir).dtype("model.embed_tokens.weight")
