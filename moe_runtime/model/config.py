"""ModelConfig: the shape and per-family switches of a MoE decoder, read from a HF config.json.

Contract: ``ModelConfig.from_hf_dict(d)`` turns a Hugging Face ``config.json``
dict of a supported family (``mixtral``, ``qwen2_moe``, ``qwen3_moe``,
``olmoe``) into one frozen dataclass; ``load_config(dir)`` reads it from a
checkpoint directory. Anything missing, mistyped or unsupported raises
``MoeError`` naming the field. ``__post_init__`` validates and does no I/O.

Family differences are folded into a few fields so that the model code has no
``if family == ...`` beyond what the fields say:

- ``qk_norm``: ``"none"`` (mixtral, qwen2_moe), ``"head"`` (qwen3_moe: RMSNorm
  over each head's ``head_dim``), ``"full"`` (olmoe: RMSNorm over the whole
  q and k projections before they are split into heads).
- ``norm_topk_prob``: renormalise the top-k softmax weights (always for mixtral).
- ``route_weights_fp32``: mixtral keeps the routing weights in float32 when it
  scales expert outputs; the others cast them back to the compute dtype.
- ``moe_layers``: the model layers that have a sparse MoE block; the rest
  (qwen's ``mlp_only_layers`` / ``decoder_sparse_step``) have a dense SwiGLU MLP.

This module knows nothing about tensors or files other than config.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_runtime.errors import MoeError

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and switches of one MoE decoder (batch size 1, SwiGLU experts, RoPE, RMSNorm)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_experts: int
    top_k: int
    moe_intermediate_size: int  # I of one routed expert
    moe_layers: tuple[int, ...]  # model layer indices with a sparse MoE block
    dense_intermediate_size: int = 0  # I of the dense MLP of non-MoE layers (qwen)
    shared_expert_intermediate_size: int = 0  # 0 = no shared expert (qwen2_moe has one)
    norm_topk_prob: bool = True
    route_weights_fp32: bool = False
    qk_norm: str = "none"  # "none" | "head" | "full"
    qkv_bias: bool = False
    o_bias: bool = False
    clip_qkv: float | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    sliding_window: int | None = None  # mixtral only: attend to the last W positions
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.model_type not in FAMILIES:
            raise MoeError(f"unsupported model_type {self.model_type!r} (supported: {', '.join(FAMILIES)})")
        for name in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "n_experts", "top_k", "moe_intermediate_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise MoeError(f"config: {name} must be a positive integer, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise MoeError(f"config: num_attention_heads ({self.n_heads}) is not a multiple of "
                           f"num_key_value_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise MoeError(f"config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.top_k > self.n_experts:
            raise MoeError(f"config: num_experts_per_tok ({self.top_k}) exceeds the number of experts "
                           f"({self.n_experts})")
        if self.qk_norm not in ("none", "head", "full"):
            raise MoeError(f"config: qk_norm must be none, head or full, got {self.qk_norm!r}")
        if not self.moe_layers:
            raise MoeError("config: no layer has a MoE block (check mlp_only_layers / decoder_sparse_step)")
        layers = list(self.moe_layers)
        if layers != sorted(set(layers)) or not 0 <= layers[0] <= layers[-1] < self.n_layers:
            raise MoeError(f"config: moe_layers {self.moe_layers} must be sorted unique layer indices "
                           f"below {self.n_layers}")
        if len(self.moe_layers) < self.n_layers and self.dense_intermediate_size <= 0:
            raise MoeError("config: dense layers present but intermediate_size is missing")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise MoeError("config: rope_theta and rms_norm_eps must be positive")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise MoeError(f"config: sliding_window must be positive or null, got {self.sliding_window}")

    @property
    def n_moe_layers(self) -> int:
        return len(self.moe_layers)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Parse a HF config.json dict; raises MoeError naming a missing, mistyped or unsupported field."""
        if not isinstance(d, dict):
            raise MoeError("config.json is not a JSON object")
        mt = d.get("model_type")
        if mt not in FAMILIES:
            raise MoeError(f"unsupported model_type {mt!r} (supported: {', '.join(FAMILIES)})")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise MoeError(f"config: hidden_act {act!r} is not supported (only silu)")
        hidden = _int(d, "hidden_size")
        heads = _int(d, "num_attention_heads")
        kv = d.get("num_key_value_heads")
        kv = heads if kv is None else _int(d, "num_key_value_heads")
        head_dim = d.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise MoeError(f"config: hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads})")
            head_dim = hidden // heads
        elif not isinstance(head_dim, int):
            raise MoeError(f"config: head_dim must be an integer, got {head_dim!r}")
        if mt == "olmoe" and head_dim * heads != hidden:
            # OLMoE sizes its q/k norms from hidden_size, which only fits head_dim == hidden // heads
            raise MoeError(f"config: olmoe needs head_dim * num_attention_heads == hidden_size, got {head_dim}")
        n_layers = _int(d, "num_hidden_layers")
        # the expert count's key differs by family and by transformers version; accept either
        keys = ("num_local_experts", "num_experts") if mt == "mixtral" else ("num_experts", "num_local_experts")
        n_experts = _int(d, next((k for k in keys if d.get(k) is not None), keys[0]))
        common = dict(
            model_type=mt, vocab_size=_int(d, "vocab_size"), hidden_size=hidden, n_layers=n_layers,
            n_heads=heads, n_kv_heads=kv, head_dim=head_dim, n_experts=n_experts,
            top_k=_int(d, "num_experts_per_tok"),
            rms_norm_eps=_float(d, "rms_norm_eps", 1e-5 if mt in ("mixtral", "olmoe") else 1e-6),
            rope_theta=_rope_theta(d, 1e6 if mt == "mixtral" else 1e4),
            max_position_embeddings=int(d.get("max_position_embeddings") or 4096),
            tie_word_embeddings=_bool(d, "tie_word_embeddings", False),
            eos_token_ids=eos_ids_from(d.get("eos_token_id"), "config.json"),
        )
        if mt == "mixtral":
            sw = d.get("sliding_window")
            return cls(**common, moe_intermediate_size=_int(d, "intermediate_size"),
                       moe_layers=tuple(range(n_layers)), norm_topk_prob=True, route_weights_fp32=True,
                       sliding_window=None if sw is None else int(sw))
        if mt == "olmoe":
            bias = _bool(d, "attention_bias", False)
            clip = d.get("clip_qkv")
            return cls(**common, moe_intermediate_size=_int(d, "intermediate_size"),
                       moe_layers=tuple(range(n_layers)), norm_topk_prob=_bool(d, "norm_topk_prob", False),
                       qk_norm="full", qkv_bias=bias, o_bias=bias, clip_qkv=None if clip is None else float(clip))
        # qwen2_moe / qwen3_moe
        if _bool(d, "use_sliding_window", False):
            raise MoeError(f"config: use_sliding_window is not supported for {mt}")
        step = _int(d, "decoder_sparse_step", 1)
        only = d.get("mlp_only_layers") or []
        if not isinstance(only, list) or not all(isinstance(i, int) for i in only):
            raise MoeError(f"config: mlp_only_layers must be a list of integers, got {only!r}")
        moe_layers = tuple(i for i in range(n_layers) if i not in only and (i + 1) % step == 0)
        dense = d.get("intermediate_size") or 0
        if mt == "qwen2_moe":
            return cls(**common, moe_intermediate_size=_int(d, "moe_intermediate_size"), moe_layers=moe_layers,
                       dense_intermediate_size=int(dense),
                       shared_expert_intermediate_size=_int(d, "shared_expert_intermediate_size"),
                       norm_topk_prob=_bool(d, "norm_topk_prob", False), qkv_bias=_bool(d, "qkv_bias", True))
        bias = _bool(d, "attention_bias", False)
        return cls(**common, moe_intermediate_size=_int(d, "moe_intermediate_size"), moe_layers=moe_layers,
                   dense_intermediate_size=int(dense), norm_topk_prob=_bool(d, "norm_topk_prob", False),
                   qk_norm="head", qkv_bias=bias, o_bias=bias)


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read ``<model_dir>/config.json`` (plus EOS ids of generation_config.json when present)."""
    d = read_json(Path(model_dir) / "config.json")
    cfg = ModelConfig.from_hf_dict(d)
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        extra = eos_ids_from(read_json(gen).get("eos_token_id"), "generation_config.json")
        merged = tuple(dict.fromkeys(cfg.eos_token_ids + extra))
        if merged != cfg.eos_token_ids:
            cfg = ModelConfig.from_hf_dict({**d, "eos_token_id": list(merged)})
    return cfg


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MoeError(f"missing file: {path}")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MoeError(f"cannot parse {path}: {e}") from None
    if not isinstance(d, dict):
        raise MoeError(f"{path} is not a JSON object")
    return d


def eos_ids_from(value: Any, where: str) -> tuple[int, ...]:
    """An ``eos_token_id`` entry (int, list of ints or null) as a tuple."""
    if value is None:
        return ()
    vals = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        raise MoeError(f"{where}: eos_token_id must be an integer or a list of integers, got {value!r}")
    return tuple(vals)


def _int(d: dict, key: str, default: int | None = None) -> int:
    v = d.get(key, default)
    if v is None:
        raise MoeError(f"config: missing field {key!r}")
    if not isinstance(v, int) or isinstance(v, bool):
        raise MoeError(f"config: {key} must be an integer, got {v!r}")
    return v


def _float(d: dict, key: str, default: float) -> float:
    v = d.get(key, default)
    if v is None:
        v = default
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise MoeError(f"config: {key} must be a number, got {v!r}")
    return float(v)


def _bool(d: dict, key: str, default: bool) -> bool:
    v = d.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise MoeError(f"config: {key} must be true or false, got {v!r}")
    return v


def _rope_theta(d: dict, default: float) -> float:
    """RoPE base: transformers 5 writes ``rope_parameters``; older configs ``rope_theta``/``rope_scaling``."""
    params = d.get("rope_parameters")
    if params is None:
        params = d.get("rope_scaling") or {}
        if not isinstance(params, dict):
            raise MoeError(f"config: rope_scaling must be an object or null, got {params!r}")
        params = {**params, "rope_theta": d.get("rope_theta", params.get("rope_theta", default))}
    if not isinstance(params, dict):
        raise MoeError(f"config: rope_parameters must be an object, got {params!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise MoeError(f"config: rope_type {kind!r} is not supported (only default RoPE)")
    return _float(params, "rope_theta", default)
