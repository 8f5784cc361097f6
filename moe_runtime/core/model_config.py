"""ModelConfig: the shape and per-family switches of a MoE decoder, read from a HF config.json.

Contract: ``ModelConfig.from_hf_dict(d)`` turns a Hugging Face ``config.json``
dict of a family in ``families.FAMILIES`` into one frozen dataclass;
``load_config(dir)`` reads it from a checkpoint directory. Anything missing,
mistyped or unsupported raises ``MoeError`` naming the field.
``__post_init__`` validates and does no I/O.

The parser is generic: which keys to read and each family's defaults come from
its ``Family`` entry. Family differences are folded into a few fields so that
the model code has no ``if family == ...``:

- ``qk_norm``: ``"none"``, ``"head"`` (RMSNorm over each head's ``head_dim``)
  or ``"full"`` (RMSNorm over the whole q and k projections before they are
  split into heads).
- ``norm_topk_prob``: renormalise the top-k softmax weights.
- ``route_weights_fp32``: keep the routing weights in float32 when they scale
  expert outputs, instead of casting them back to the compute dtype.
- ``moe_layers``: the model layers that have a sparse MoE block; the rest have
  a dense SwiGLU MLP. ``n_layers`` counts all decoder layers, ``n_moe_layers``
  the MoE ones.

This module knows nothing about tensors or files other than config.json.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_runtime.core.errors import MoeError
from moe_runtime.core.config_files import input_file
from moe_runtime.core.families import FAMILIES, Family, get_family
from moe_runtime.core.resources import check_fits
from moe_runtime.core.hf_fields import Yarn, eos_ids_from, read_bool, read_dtype_name, read_int


PER_LAYER_BYTES = 1024  # what parsing keeps per declared layer (list entries), generously


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and switches of one MoE decoder (batch size 1, SwiGLU experts, RoPE, RMSNorm)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    n_layers: int  # all decoder layers (``n_moe_layers`` counts the MoE ones)
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_experts: int
    top_k: int
    moe_intermediate_size: int  # I of one routed expert
    moe_layers: tuple[int, ...]  # model layer indices with a sparse MoE block
    dense_intermediate_size: int = 0  # I of the dense MLP of non-MoE layers
    shared_expert_intermediate_size: int = 0  # I of the one gated shared expert; 0 = none
    norm_topk_prob: bool = True
    route_weights_fp32: bool = False
    qk_norm: str = "none"  # "none" | "head" | "full"
    qkv_bias: bool = False
    o_bias: bool = False
    clip_qkv: float | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    sliding_window: int | None = None  # attend to the last W positions only
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # the families after the first four (deepseek_v2/v3, glm4_moe, gpt_oss); defaults leave those unchanged
    shared_expert_gated: bool = True  # qwen2_moe's sigmoid-gated shared expert; deepseek/glm add theirs ungated
    attention: str = "gqa"  # "gqa" | "mla"
    q_lora_rank: int = 0  # mla: 0 = a plain q projection
    kv_lora_rank: int = 0  # mla: the cached latent's width
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0  # mla: the decoupled RoPE key, cached beside the latent
    v_head_dim: int = 0
    rope_interleave: bool = False  # RoPE over interleaved pairs (x0, x1), (x2, x3)... (deepseek)
    rotary_fraction: float = 1.0  # RoPE covers the first fraction of each head (glm4_moe: 0.5)
    yarn: Yarn | None = None  # YaRN RoPE scaling
    attention_sinks: bool = False
    layer_types: tuple[str, ...] = ()  # per layer full_attention | sliding_attention; () = all alike
    router: str = "softmax"  # softmax | sigmoid | topk_softmax
    router_fp32: bool = False
    router_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_weight_fp32: bool = False
    expert_activation: str = "silu"  # silu | clamped_swiglu: the expert format's forward
    expert_biases: bool = False  # b1, b3, b2 per routed expert (part of the expert format and its bytes)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    quantization: str | None = None  # the checkpoint's expert quantization (mxfp4)

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
        bad_eos = [i for i in self.eos_token_ids if i >= self.vocab_size]
        if bad_eos:
            raise MoeError(f"config: eos_token_id {bad_eos[0]} is outside the vocabulary ({self.vocab_size} tokens)")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise MoeError("config: rope_theta and rms_norm_eps must be positive")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise MoeError(f"config: sliding_window must be positive or null, got {self.sliding_window}")
        if self.layer_types and (len(self.layer_types) != self.n_layers or (
                "sliding_attention" in self.layer_types and self.sliding_window is None)):
            raise MoeError("config: layer_types needs one entry per layer, and sliding_window for sliding layers")
        if self.attention == "mla":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, name) <= 0:
                    raise MoeError(f"config: {name} must be a positive integer, got {getattr(self, name)!r}")
            if self.qk_rope_head_dim % 2:
                raise MoeError(f"config: qk_rope_head_dim must be even for RoPE, got {self.qk_rope_head_dim}")
        if self.rotary_dim % 2 or self.rotary_dim <= 0:
            raise MoeError(f"config: the rotary part of a head ({self.rotary_dim}) must be even and positive")
        if self.n_group < 1 or self.topk_group < 1 or self.topk_group > self.n_group or self.n_experts % self.n_group:
            raise MoeError(f"config: n_group ({self.n_group}) must divide the {self.n_experts} experts and "
                           f"topk_group ({self.topk_group}) lie in [1, n_group]")
        if self.router == "sigmoid" and self.n_experts // self.n_group < 2:
            raise MoeError("config: sigmoid group routing needs at least 2 experts per group")
        if self.n_experts // self.n_group * self.topk_group < self.top_k:
            raise MoeError(f"config: topk_group ({self.topk_group}) groups of {self.n_experts // self.n_group} "
                           f"experts hold fewer than num_experts_per_tok ({self.top_k})")

    @property
    def rotary_dim(self) -> int:
        """Dimensions of a head that RoPE rotates (MLA: the decoupled rope key)."""
        if self.attention == "mla":
            return self.qk_rope_head_dim
        return int(self.head_dim * self.rotary_fraction)

    def kv_elements_per_token(self) -> int:
        """KV-cache elements one token adds in one layer: k and v of every KV head, or MLA's latent and rope key."""
        if self.attention == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.n_kv_heads * self.head_dim

    @property
    def n_moe_layers(self) -> int:
        """MoE layers only; ``n_layers`` counts every decoder layer."""
        return len(self.moe_layers)

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Parse a HF config.json dict; raises MoeError naming a missing, mistyped or unsupported field."""
        if not isinstance(d, dict):
            raise MoeError("config.json is not a JSON object")
        fam = get_family(d.get("model_type"))
        read_dtype_name(d)  # a dtype name that names nothing is refused here, where config.json is parsed
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise MoeError(f"config: hidden_act {act!r} is not supported (only silu)")
        hidden = read_int(d, "hidden_size")
        heads = read_int(d, "num_attention_heads")
        kv = d.get("num_key_value_heads")
        kv = heads if kv is None else read_int(d, "num_key_value_heads")
        head_dim = d.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise MoeError(f"config: hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads})")
            head_dim = hidden // heads
        else:
            head_dim = read_int(d, "head_dim", lo=1)
        if fam.qk_norm == "full" and head_dim * heads != hidden:
            # a full q/k norm is sized from hidden_size, which only fits head_dim == hidden // heads
            raise MoeError(f"config: {fam.model_type} needs head_dim * num_attention_heads == hidden_size, "
                           f"got {head_dim}")
        n_layers = read_int(d, "num_hidden_layers")
        keys = fam.expert_count_keys
        n_experts = read_int(d, next((k for k in keys if d.get(k) is not None), keys[0]))
        # the per-layer tables built next (MoE layer list, layer types) take memory per layer and expert:
        # a declared 10**9 layers is refused here with the numbers, before a list of them exists
        check_fits(f"config.json's {n_layers:,} layers x {n_experts:,} experts (their per-layer tables)",
                   PER_LAYER_BYTES * n_layers + 64 * n_experts)
        switches = fam.switches(d)
        moe_layers = fam.moe_layers(d, n_layers)
        head_dim, kv = switches.pop("head_dim", head_dim), switches.pop("n_kv_heads", kv)  # mla sets its own
        shared = read_int(d, fam.shared_expert_key) if fam.shared_expert_key else 0
        if fam.shared_experts_key:  # deepseek/glm: n ungated shared experts of the routed size, as one MLP
            shared = read_int(d, fam.shared_experts_key, 0) * read_int(d, fam.expert_size_key)
        return cls(
            model_type=fam.model_type, vocab_size=read_int(d, "vocab_size"), hidden_size=hidden,
            n_layers=n_layers, n_heads=heads, n_kv_heads=kv, head_dim=head_dim, n_experts=n_experts,
            top_k=read_int(d, "num_experts_per_tok"), moe_intermediate_size=read_int(d, fam.expert_size_key),
            moe_layers=moe_layers,
            dense_intermediate_size=read_int(d, fam.dense_size_key, 0) if fam.dense_size_key else 0,
            shared_expert_intermediate_size=shared,
            max_position_embeddings=read_int(d, "max_position_embeddings", 4096, lo=1),
            tie_word_embeddings=read_bool(d, "tie_word_embeddings", False),
            eos_token_ids=eos_ids_from(d.get("eos_token_id"), "config.json"),
            **switches,
        )


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
    if not os.path.lexists(path):
        raise MoeError(f"missing file: {path}")
    input_file(path, "JSON file")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: bad JSON, a 5000-digit int
        raise MoeError(f"cannot parse {path}: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(d, dict):
        raise MoeError(f"{path} is not a JSON object")
    return d
