"""Where experts come from: host memory (the store) or storage (a packed file, or the checkpoint itself).

Contract:
- ``parse_expert_source("memory" | "disk" | "disk:FILE")`` -> (kind, path).
- ``disk_source(model_dir, store, packed=None)`` -> ``DiskSource``: the files to
  open and ``segments(layer, expert)``, each expert's byte ranges in slot order
  (``packed.py``). With a packed file, the file must match the model
  (fingerprint, layers, experts, record size, dtype) and the checkpoint's
  weights (``weights_digest`` of its non-expert tensors; each record's CRC is
  checked by the reader at its first read); without one, experts are
  read from the checkpoint's safetensors files where they lie, which works
  when the checkpoint stores them in the run's dtype and the plain w1|w3|w2
  layout, and is refused with a line that says to pack otherwise.
- ``pack_model(model_dir, out, expert_dtype="auto", dtype=None)`` writes the
  packed file layer by layer, so a model whose experts exceed host memory can
  be packed, in any expert format (float, int8/int4 quantized, MXFP4 as stored).

On a CPU-only machine host memory is the compute tier: the slot pool (the
expert budget) is in RAM and the disk is the slow link. This module knows
nothing about caches or predictors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from moe_runtime.core.errors import MoeError
from moe_runtime.core.model_config import load_config
from moe_runtime.model.experts import HostExpertStore
from moe_runtime.offload.packed import (SafetensorsLayout, Segment, check, config_fingerprint, read_header,
                                        weights_digest, write_packed)

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


@dataclass(frozen=True)
class DiskSource:
    paths: list[str]
    segments: Callable[[int, int], tuple[Segment, ...]]
    describe: str  # what is read, for the report


def _fingerprint(model_dir) -> str:
    try:
        return config_fingerprint(json.loads((Path(model_dir) / "config.json").read_text()))
    except (OSError, ValueError) as e:
        raise MoeError(f"cannot read {model_dir}/config.json: {e}") from None


def disk_source(model_dir, store: HostExpertStore, packed: str | None = None) -> DiskSource:
    """The experts of ``store``'s shape on storage; see the module docstring."""
    layout = store.layout
    if packed is not None:
        hdr = read_header(packed)
        check(hdr, fingerprint=_fingerprint(model_dir), record_bytes=layout.nbytes, n_moe_layers=store.n_moe_layers,
              n_experts=store.n_experts, dtype=layout.name, weights=weights_digest(SafetensorsLayout(model_dir)))
        return DiskSource([hdr.path], hdr.segments, f"packed file {hdr.path}")
    cfg = load_config(model_dir)
    names, st = cfg.family.names, SafetensorsLayout(model_dir)
    want = _ST_DTYPES.get(layout.dtype)
    moe_layers = cfg.moe_layers

    def parts(m: int, e: int) -> list[tuple[str, int | None]]:
        layer = moe_layers[m]
        for block in names.fused_blocks:
            gate_up, down = names.fused(layer, block)
            if gate_up in st.tensors:
                return [(gate_up, e), (down, e)]  # gate rows then up rows: w1 | w3, then w2
        return [(n, None) for n in names.per_expert(layer, e)]

    pack_first = (f"pack them first (moe-runtime pack --model {model_dir} --out FILE, then --expert-source "
                  "disk:FILE)")
    if cfg.quantization or any(name not in st.tensors for name, _ in parts(0, 0)):  # MXFP4 blocks and scales
        raise MoeError(f"the checkpoint's experts ({cfg.quantization or 'another layout'}) cannot be read in place "
                       f"from its safetensors files: {pack_first}")
    for name, _ in parts(0, 0):
        if name in st.tensors and st.tensors[name][4] != want:
            raise MoeError(f"the checkpoint stores experts as {st.tensors[name][4]}, this run keeps them as "
                           f"{layout.name}: pack them first (moe-runtime pack --model {model_dir} --expert-dtype "
                           f"{layout.name} --out FILE, then --expert-source disk:FILE)")
    segments = {(m, e): st.segments(parts(m, e)) for m in range(store.n_moe_layers) for e in range(store.n_experts)}
    for key, segs in segments.items():
        if sum(n for _, _, n in segs) != layout.nbytes:
            raise MoeError(f"expert {key} of the checkpoint is {sum(n for _, _, n in segs):,} bytes, "
                           f"expected {layout.nbytes:,}: pack the experts first")
    return DiskSource(st.files, lambda m, e: segments[(m, e)],
                      f"the checkpoint's safetensors files ({len(st.files)}, aligned over-reads)")


def pack_model(model_dir, out, expert_dtype: str = "auto", dtype: torch.dtype | None = None) -> dict:
    """Write ``model_dir``'s experts as a packed file, in the format ``expert_dtype`` gives (default: the
    checkpoint's, float experts in ``dtype``, default the checkpoint's dtype; int8/int4 quantized as
    ``generate --expert-dtype`` does at load, so a run with the same flag reads them as they are)."""
    from moe_runtime.model.checkpoint import SafetensorsReader, expert_format, load_layer_experts

    cfg = load_config(model_dir)
    reader = SafetensorsReader(model_dir)
    if expert_dtype in ("float32", "bfloat16", "float16"):
        dtype = getattr(torch, expert_dtype)
    dtype = dtype or reader.dtype("model.embed_tokens.weight")
    layout = expert_format(cfg, expert_dtype, dtype)
    probe = HostExpertStore(layout, cfg.n_experts, cfg.top_k, cfg.moe_layers, pin=False, allocate=False)

    def layers():
        buf = torch.empty(cfg.n_experts, layout.numel, dtype=layout.dtype)  # one layer in memory at a time
        for m in range(probe.n_moe_layers):
            load_layer_experts(cfg, reader, m, buf, layout)
            yield buf.view(torch.uint8).numpy().reshape(cfg.n_experts, -1)

    write_packed(out, fingerprint=_fingerprint(model_dir), dtype=layout.name, record_bytes=layout.nbytes,
                 n_moe_layers=probe.n_moe_layers, n_experts=cfg.n_experts, layers=layers(),
                 weights=weights_digest(SafetensorsLayout(model_dir)))
    return {"out": str(out), "experts": probe.n_moe_layers * cfg.n_experts, "record_bytes": layout.nbytes,
            "bytes": probe.nbytes, "dtype": layout.name}
