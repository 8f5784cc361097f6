"""`moe-runtime make-tiny`: write a tiny random MoE checkpoint, without transformers.

Contract: ``write_tiny_checkpoint(family, out, seed=0, dtype="float32",
fused_experts=False, **config_overrides) -> Path`` writes ``config.json``
(HF field names of the family), ``model.safetensors`` in the real Hugging Face
per-expert layout (or transformers 5's fused ``experts.gate_up_proj`` /
``experts.down_proj`` with ``fused_experts=True``; GPT-OSS always in its own
fused, transposed, gate/up-interleaved layout with biases, or with
``expert_dtype="mxfp4"`` as ``*_blocks``/``*_scales`` plus
``quantization_config``, as openai/gpt-oss-* ship), ``generation_config.json``,
a character-level ``tokenizer.json`` and ``tokenizer_config.json`` with a simple chat template. The same
seed gives the same bytes.
``config_overrides`` are config.json keys (e.g. ``num_experts_per_tok=3``).

The tensor shapes come from the model itself (on the meta device) and the
names from the family's ``TensorNames``, as checkpoint.py reads them; the
family's own config.json fields come from its ``Family.tiny_config``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import save

from moe_runtime.model.checkpoint import DTYPES
from moe_runtime.core.outputs import write_atomic, write_json_atomic, write_text_atomic
from moe_runtime.core.model_config import ModelConfig
from moe_runtime.core.families import FAMILIES
from moe_runtime.model.formats import quantize_mxfp4
from moe_runtime.core.errors import MoeError
from moe_runtime.model.transformer import Transformer

TINY_EXPERT_DTYPES = ("auto", "mxfp4")
# printable ASCII, one token per character, after three specials
SPECIALS = ["<unk>", "<s>", "</s>"]
CHARS = [chr(c) for c in range(32, 127)]

# a minimal chat template (for `moe-runtime serve`'s /v1/chat/completions): printable ASCII only, so the
# character tokenizer encodes it
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")

# the fields every family shares; each family's own come from its Family.tiny_config
BASE = dict(vocab_size=len(SPECIALS) + len(CHARS) + 2, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=2048, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, hidden_act="silu")


def tiny_config_dict(family: str, **overrides) -> dict:
    """The config.json dict of a tiny model of ``family``, with ``overrides`` applied."""
    if family not in FAMILIES:
        raise MoeError(f"unknown family {family!r} (choose {', '.join(FAMILIES)})")
    fam = FAMILIES[family]
    # a deep copy: the table's lists (mlp_only_layers) must not change when a caller edits the dict
    return copy.deepcopy({"model_type": family, **BASE, "architectures": [fam.architecture], **fam.tiny_config,
                          **overrides})


def _gpt_oss_experts(cfg: ModelConfig, gen: torch.Generator, layer: int, mxfp4: bool) -> dict[str, torch.Tensor]:
    """One layer's experts in GPT-OSS's layout: gate_up_proj [E, H, 2I] (gate, up columns interleaved)."""
    h, i, n_e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_experts
    gate_up, down = cfg.family.names.fused(layer)
    w13, w2 = 0.02 * torch.randn(n_e, h, 2 * i, generator=gen), 0.02 * torch.randn(n_e, i, h, generator=gen)
    out = {gate_up + "_bias": 0.02 * torch.randn(n_e, 2 * i, generator=gen),
           down + "_bias": 0.02 * torch.randn(n_e, h, generator=gen)}
    if not mxfp4:
        return {**out, gate_up: w13, down: w2}
    for name, w in ((gate_up, w13), (down, w2)):
        qs = [quantize_mxfp4(r) for r in w.transpose(1, 2)]  # blocks run along the input dimension
        out[name + "_blocks"] = torch.stack([q.blocks for q in qs])  # [E, out, in/32, 16]
        out[name + "_scales"] = torch.stack([q.scales for q in qs])  # [E, out, in/32]
    return out


def _random_tensors(cfg: ModelConfig, gen: torch.Generator, fused: bool,
                    mxfp4: bool = False) -> dict[str, torch.Tensor]:
    names = cfg.family.names
    with torch.device("meta"):
        model = Transformer(cfg)
    tensors = {}
    for name, p in model.state_dict().items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)  # norms near 1, not exactly 1
        else:
            t = 0.02 * torch.randn(p.shape, generator=gen)
        # HF's own names (aliases) in the per-expert layout; GPT-OSS has no other (its router is mlp.router)
        tensors[names.dense(name, classic=not fused or names.interleaved_gate_up)] = t
    h, i, n_e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_experts
    for layer in cfg.moe_layers:
        if names.interleaved_gate_up:
            tensors.update(_gpt_oss_experts(cfg, gen, layer, mxfp4))
            continue
        w1, w3, w2 = (0.02 * torch.randn(n_e, *s, generator=gen) for s in ((i, h), (i, h), (h, i)))
        if fused:
            gate_up, down = names.fused(layer)
            tensors[gate_up] = torch.cat([w1, w3], dim=1)  # [E, 2I, H], gate rows first
            tensors[down] = w2  # [E, H, I]
            continue
        for e in range(n_e):
            n1, n3, n2 = names.per_expert(layer, e)
            tensors.update({n1: w1[e], n3: w3[e], n2: w2[e]})
    return tensors


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    # BPE without merges splits text into characters; Fuse joins them back without spaces
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return tok.to_str()


def write_tiny_checkpoint(family: str, out: str | Path, seed: int = 0, dtype: str = "float32",
                          fused_experts: bool = False, expert_dtype: str = "auto", **overrides) -> Path:
    """Write a tiny random checkpoint of ``family`` to directory ``out``; see the module docstring."""
    if dtype not in DTYPES:
        raise MoeError(f"unsupported dtype {dtype!r} (choose {', '.join(DTYPES)})")
    ships_mxfp4 = family in FAMILIES and "mxfp4" in FAMILIES[family].quantizations
    if expert_dtype not in TINY_EXPERT_DTYPES or (expert_dtype == "mxfp4" and not ships_mxfp4):
        raise MoeError(f"make-tiny writes experts as auto (the --dtype) or, for a family whose checkpoints "
                       f"ship MXFP4 (gpt_oss), mxfp4; not {expert_dtype!r} for {family}")
    if expert_dtype == "mxfp4":
        overrides = {"quantization_config": {"quant_method": "mxfp4"}, **overrides}
    d = tiny_config_dict(family, torch_dtype=dtype, **overrides)
    cfg = ModelConfig.from_hf_dict(d)
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: v.contiguous() if v.dtype == torch.uint8 else v.to(DTYPES[dtype]).contiguous()
               for k, v in _random_tensors(cfg, gen, fused_experts, expert_dtype == "mxfp4").items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # atomic, with the usual file mode (safetensors' own save_file leaves 0600)
    data = save(tensors, metadata={"format": "pt"})
    write_atomic(out / "model.safetensors", lambda f: f.write(data))
    write_json_atomic(out / "config.json", d, indent=2)
    gen_cfg = {"bos_token_id": d.get("bos_token_id"), "eos_token_id": d.get("eos_token_id")}
    write_json_atomic(out / "generation_config.json", gen_cfg, indent=2)
    write_text_atomic(out / "tokenizer.json", _tokenizer_json())
    tok_cfg = {"bos_token": SPECIALS[1], "eos_token": SPECIALS[2], "chat_template": CHAT_TEMPLATE}
    write_json_atomic(out / "tokenizer_config.json", tok_cfg, indent=2)
    return out
