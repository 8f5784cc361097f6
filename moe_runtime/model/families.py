"""The model families, one table: everything that differs between them, as data and small functions.

Contract: ``FAMILIES`` maps a config.json ``model_type`` to a frozen ``Family``;
``get_family(model_type)`` returns one or raises ``MoeError`` listing the
supported ones. A ``Family`` says

- how its config.json maps onto ``ModelConfig``: the keys that name the expert
  count and sizes, which layers are MoE, the shared expert, and the switches
  the model code reads (``Family.switches``); config.py applies it;
- its checkpoint tensor names (``TensorNames``), read by checkpoint.py and
  written by tiny.py;
- what ``make-tiny`` writes into a tiny config.json, and which model specs a
  synthetic model of the family stands for (``synthetic_family``).

Adding a family is adding an entry. A family with a new kind of difference
(MLA attention, a router with a bias) adds a field here whose default leaves
the other families unchanged, plus the code that reads it; nothing else
branches on ``model_type``.

This module imports no torch (the simulator's model spec derives from it),
knows no tensors and reads no files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from moe_runtime.errors import MoeError
from moe_runtime.model.hf_fields import read_bool, read_float, read_int, read_int_list, read_rope_theta


# ---- which decoder layers have a sparse MoE block ------------------------------------------

def every_layer(d: dict, n_layers: int) -> tuple[int, ...]:
    return tuple(range(n_layers))


def sparse_step_layers(d: dict, n_layers: int) -> tuple[int, ...]:
    """qwen: every ``decoder_sparse_step``-th layer, minus ``mlp_only_layers`` (those get a dense MLP)."""
    step = read_int(d, "decoder_sparse_step", 1)
    if step < 1:
        raise MoeError(f"config: decoder_sparse_step must be >= 1, got {step}")
    only = set(read_int_list(d, "mlp_only_layers"))
    return tuple(i for i in range(n_layers) if i not in only and (i + 1) % step == 0)


# ---- checkpoint tensor names -----------------------------------------------------------------

@dataclass(frozen=True)
class TensorNames:
    """Where a family's tensors sit in a HF checkpoint.

    Dense tensors are named as our modules plus ``model.`` (``lm_head.*`` as is):
    the router ``mlp.gate``, ``mlp.shared_expert.*`` and ``mlp.shared_expert_gate``,
    the norms ``input_layernorm``, ``post_attention_layernorm`` and
    ``self_attn.q_norm``/``k_norm``. A family that names one differently lists
    (ours, HF's) name parts in ``aliases``: the loader tries ours first, then
    HF's, and make-tiny writes HF's in the per-expert layout.
    """

    expert_block: str = "mlp"  # per-expert layout: layers.{i}.{expert_block}.experts.{e}.{w}.weight
    expert_weights: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # w1 (gate), w3 (up), w2 (down)
    fused_block: str = "mlp"  # where transformers 5 writes the fused experts
    fused_weights: tuple[str, str] = ("gate_up_proj", "down_proj")  # [E, 2I, H] gate rows first, [E, H, I]
    aliases: tuple[tuple[str, str], ...] = ()

    def dense(self, name: str, classic: bool = False) -> str:
        """HF name of one of our dense parameters; ``classic`` applies the per-expert layout's aliases."""
        if name.startswith("lm_head."):
            return name
        hf = "model." + name
        for ours, theirs in self.aliases if classic else ():
            hf = hf.replace(ours, theirs)
        return hf

    def per_expert(self, layer: int, e: int) -> tuple[str, str, str]:
        """Names of expert ``e``'s w1, w3, w2 in model layer ``layer`` (per-expert layout)."""
        p = f"model.layers.{layer}.{self.expert_block}.experts.{e}"
        return tuple(f"{p}.{w}.weight" for w in self.expert_weights)

    def fused(self, layer: int, block: str | None = None) -> tuple[str, str]:
        """Names of a layer's fused gate_up and down tensors under ``block`` (default ``fused_block``)."""
        p = f"model.layers.{layer}.{block or self.fused_block}.experts"
        return tuple(f"{p}.{w}" for w in self.fused_weights)

    @property
    def fused_blocks(self) -> tuple[str, ...]:
        """Blocks the loader looks in for fused experts: older exports used the per-expert block's name."""
        return tuple(dict.fromkeys((self.expert_block, self.fused_block)))


# ---- the family ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    """What one model family does differently; defaults are the common case. See the module docstring."""

    model_type: str
    architecture: str  # config.json "architectures" entry
    # config.json -> ModelConfig shapes
    expert_count_keys: tuple[str, ...]  # the first one present gives n_experts (it moved between transformers versions)
    expert_size_key: str  # intermediate size of one routed expert
    moe_layers: Callable[[dict, int], tuple[int, ...]] = every_layer
    dense_size_key: str | None = None  # intermediate size of the dense MLP of non-MoE layers
    shared_expert_key: str | None = None  # one gated shared expert of this intermediate size (required when set)
    # config.json -> ModelConfig switches the model code reads
    norm_topk_prob: bool | None = None  # fixed; None reads config "norm_topk_prob" (default False)
    route_weights_fp32: bool = False  # route weights stay float32 when they scale expert outputs
    qk_norm: str = "none"  # "none" | "head" (per head) | "full" (over the whole q/k projection)
    bias_key: str | None = None  # config key switching q/k/v biases on; None: never biased
    bias_default: bool = False
    o_bias: bool = False  # o_proj is biased when q/k/v are
    reads_clip_qkv: bool = False
    sliding_window_key: str | None = None
    refused_flags: tuple[str, ...] = ()  # config keys that must not be true: features we do not implement
    rms_norm_eps: float = 1e-6  # defaults for when config.json omits them
    rope_theta: float = 1e4
    names: TensorNames = TensorNames()
    # make-tiny and synthetic models
    tiny_config: dict[str, Any] = field(default_factory=dict, hash=False)  # family fields of a tiny config.json
    spec_prefixes: tuple[str, ...] = ()  # model-spec names a synthetic model of this family stands for
    synthetic_default: bool = False  # stands for specs no family names (one with, one without shared experts)

    def switches(self, d: dict) -> dict[str, Any]:
        """The ``ModelConfig`` switches read from config dict ``d`` (``{}`` gives the family's defaults)."""
        for flag in self.refused_flags:
            if read_bool(d, flag, False):
                raise MoeError(f"config: {flag} is not supported for {self.model_type}")
        bias = read_bool(d, self.bias_key, self.bias_default) if self.bias_key else False
        topk = self.norm_topk_prob
        clip = d.get("clip_qkv") if self.reads_clip_qkv else None
        window = d.get(self.sliding_window_key) if self.sliding_window_key else None
        return dict(
            norm_topk_prob=read_bool(d, "norm_topk_prob", False) if topk is None else topk,
            route_weights_fp32=self.route_weights_fp32, qk_norm=self.qk_norm,
            qkv_bias=bias, o_bias=bias and self.o_bias,
            clip_qkv=None if clip is None else float(clip),
            sliding_window=None if window is None else int(window),
            rms_norm_eps=read_float(d, "rms_norm_eps", self.rms_norm_eps),
            rope_theta=read_rope_theta(d, self.rope_theta),
        )


_QWEN = dict(expert_count_keys=("num_experts", "num_local_experts"), expert_size_key="moe_intermediate_size",
             moe_layers=sparse_step_layers, dense_size_key="intermediate_size", refused_flags=("use_sliding_window",))

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family(
        "mixtral", "MixtralForCausalLM",
        expert_count_keys=("num_local_experts", "num_experts"), expert_size_key="intermediate_size",
        norm_topk_prob=True, route_weights_fp32=True, sliding_window_key="sliding_window",
        rms_norm_eps=1e-5, rope_theta=1e6,
        names=TensorNames(expert_block="block_sparse_moe", expert_weights=("w1", "w3", "w2"),
                          aliases=((".mlp.gate.", ".block_sparse_moe.gate."),)),
        tiny_config=dict(intermediate_size=96, num_local_experts=8, rms_norm_eps=1e-5, rope_theta=1e6,
                         sliding_window=None),
        spec_prefixes=("mixtral",)),
    Family(
        "qwen2_moe", "Qwen2MoeForCausalLM", **_QWEN,
        shared_expert_key="shared_expert_intermediate_size", bias_key="qkv_bias", bias_default=True,
        tiny_config=dict(intermediate_size=128, moe_intermediate_size=48, shared_expert_intermediate_size=96,
                         num_experts=8, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False,
                         qkv_bias=True, rms_norm_eps=1e-6, rope_theta=1e4, use_sliding_window=False),
        spec_prefixes=("qwen1.5", "qwen2"), synthetic_default=True),
    Family(
        "qwen3_moe", "Qwen3MoeForCausalLM", **_QWEN,
        qk_norm="head", bias_key="attention_bias", o_bias=True,
        tiny_config=dict(intermediate_size=128, moe_intermediate_size=48, num_experts=8, head_dim=16,
                         decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, attention_bias=False,
                         rms_norm_eps=1e-6, rope_theta=1e4, use_sliding_window=False),
        spec_prefixes=("qwen3",), synthetic_default=True),
    Family(
        "olmoe", "OlmoeForCausalLM",
        expert_count_keys=("num_experts", "num_local_experts"), expert_size_key="intermediate_size",
        qk_norm="full", bias_key="attention_bias", o_bias=True, reads_clip_qkv=True, rms_norm_eps=1e-5,
        tiny_config=dict(intermediate_size=48, num_experts=8, norm_topk_prob=False, attention_bias=False,
                         clip_qkv=None, rms_norm_eps=1e-5, rope_theta=1e4),
        spec_prefixes=("olmoe",)),
)}


def get_family(model_type: Any) -> Family:
    if model_type not in FAMILIES:
        raise MoeError(f"unsupported model_type {model_type!r} (supported: {', '.join(FAMILIES)})")
    return FAMILIES[model_type]


def synthetic_family(spec_name: str, has_shared_experts: bool) -> Family:
    """The family a synthetic model of a model spec takes.

    Only a family with a shared expert holds a spec's shared experts, and only
    one without stands for a spec without them. Among those, the one whose
    ``spec_prefixes`` start the spec's name, else the ``synthetic_default`` one
    (qwen2_moe with shared experts, qwen3_moe without).
    """
    fits = [f for f in FAMILIES.values() if (f.shared_expert_key is not None) == has_shared_experts]
    named = [f for f in fits if f.spec_prefixes and spec_name.startswith(f.spec_prefixes)]
    return (named or [f for f in fits if f.synthetic_default])[0]
