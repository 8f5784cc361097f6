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

from moe_runtime.core.errors import MoeError
from moe_runtime.core.hf_fields import read_bool, read_float, read_int, read_int_list, read_rope


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


def first_k_dense_layers(d: dict, n_layers: int) -> tuple[int, ...]:
    """deepseek / glm4_moe: layers from ``first_k_dense_replace`` on are MoE (the first k have a dense MLP)."""
    k = read_int(d, "first_k_dense_replace", 0)
    if not 0 <= k < n_layers:
        raise MoeError(f"config: first_k_dense_replace must be in [0, {n_layers}), got {k}")
    return tuple(range(k, n_layers))


# ---- family-specific config fields -----------------------------------------------------------

def mla_fields(d: dict) -> dict[str, Any]:
    """Multi-head latent attention (deepseek_v2/v3): the latent ranks and head dims. Every head has its own
    K/V expanded from the shared latent, so n_kv_heads = n_heads; head_dim is the query head (nope + rope)."""
    q_rank = d.get("q_lora_rank")
    f = dict(q_lora_rank=0 if q_rank is None else read_int(d, "q_lora_rank"),
             kv_lora_rank=read_int(d, "kv_lora_rank"), qk_nope_head_dim=read_int(d, "qk_nope_head_dim"),
             qk_rope_head_dim=read_int(d, "qk_rope_head_dim"), v_head_dim=read_int(d, "v_head_dim"))
    return dict(f, head_dim=f["qk_nope_head_dim"] + f["qk_rope_head_dim"], n_kv_heads=read_int(d, "num_attention_heads"))


def group_routing(d: dict) -> dict[str, Any]:
    """Group-limited top-k (deepseek, glm4_moe): experts in ``n_group`` groups, only ``topk_group`` searched."""
    n_group, topk_group = read_int(d, "n_group", 1), read_int(d, "topk_group", 1)
    return dict(n_group=n_group, topk_group=topk_group,
                routed_scaling_factor=read_float(d, "routed_scaling_factor", 1.0, lo=0, lo_open=True))


def deepseek_v2_fields(d: dict) -> dict[str, Any]:
    method = d.get("topk_method") or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
        raise MoeError(f"config: topk_method {method!r} is not supported for deepseek_v2 "
                       f"(greedy, group_limited_greedy)")
    f = dict(mla_fields(d), **group_routing(d))
    if method == "greedy":  # transformers ignores n_group/topk_group then
        f.update(n_group=1, topk_group=1)
    return f


def deepseek_v3_fields(d: dict) -> dict[str, Any]:
    return dict(mla_fields(d), **group_routing(d), rope_interleave=read_bool(d, "rope_interleave", True))


def glm4_moe_fields(d: dict) -> dict[str, Any]:
    return dict(group_routing(d), qk_norm="head" if read_bool(d, "use_qk_norm", False) else "none")


def gpt_oss_fields(d: dict) -> dict[str, Any]:
    n = read_int(d, "num_hidden_layers")
    types = d.get("layer_types")
    if types is None:  # transformers' default: even layers slide, odd layers attend fully
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    if not isinstance(types, list) or len(types) != n or not set(types) <= {"sliding_attention", "full_attention"}:
        raise MoeError(f"config: layer_types must list sliding_attention/full_attention for each of the {n} "
                       f"layers, got {types!r}")
    return dict(layer_types=tuple(types), swiglu_alpha=read_float(d, "swiglu_alpha", 1.702),
                swiglu_limit=read_float(d, "swiglu_limit", 7.0))


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
    # the only expert layout: fused [E, H, 2I] (transposed) with gate and up columns interleaved, down
    # [E, I, H], each with a ``_bias`` tensor, or ``_blocks``/``_scales`` when MXFP4 (GPT-OSS)
    interleaved_gate_up: bool = False
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
    norm_topk_default: bool = False  # "norm_topk_prob" when config.json omits it
    shared_experts_key: str | None = None  # ungated shared experts: this many x the routed expert's size
    attention: str = "gqa"  # "gqa" | "mla" (multi-head latent attention)
    attention_sinks: bool = False  # one learned sink logit per head joins the softmax (gpt_oss)
    router: str = "softmax"  # "softmax" | "sigmoid" (with e_score_correction_bias) | "topk_softmax" (gpt_oss)
    router_fp32: bool = False  # router logits computed in float32 from float32 weights
    router_bias: bool = False
    norm_weight_fp32: bool = False  # RMSNorm multiplies the weight in float32, then casts (gpt_oss)
    expert_activation: str = "silu"  # "silu" | "clamped_swiglu" (gpt_oss): the expert format's forward
    expert_biases: bool = False  # b1, b3, b2 per routed expert (gpt_oss): part of the expert format
    yarn: bool = False  # YaRN RoPE scaling accepted
    rope_defaults: dict[str, Any] = field(default_factory=dict, hash=False)  # when config.json has none
    partial_rotary_default: float = 1.0
    quantizations: tuple[str, ...] = ()  # quantization_config.quant_method values the loader reads
    fields: Callable[[dict], dict[str, Any]] | None = None  # family-specific ModelConfig fields
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
        theta, yarn, partial = read_rope({"partial_rotary_factor": self.partial_rotary_default, **d},
                                         self.rope_theta, self.yarn, self.rope_defaults)
        quant = d.get("quantization_config")
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        if quant is not None and method not in self.quantizations:
            raise MoeError(f"config: quantization {method!r} is not supported for {self.model_type} "
                           f"(supported: {', '.join(self.quantizations) or 'none'}; give the unquantized weights)")
        extra = dict(
            attention=self.attention, attention_sinks=self.attention_sinks, router=self.router,
            router_fp32=self.router_fp32, router_bias=self.router_bias, norm_weight_fp32=self.norm_weight_fp32,
            expert_activation=self.expert_activation, expert_biases=self.expert_biases, yarn=yarn, quantization=method,
            shared_expert_gated=self.shared_experts_key is None,
            rotary_fraction=partial, rope_interleave=self.attention == "mla")
        return dict(
            norm_topk_prob=read_bool(d, "norm_topk_prob", self.norm_topk_default) if topk is None else topk,
            route_weights_fp32=self.route_weights_fp32, qk_norm=self.qk_norm,
            qkv_bias=bias, o_bias=bias and self.o_bias,
            clip_qkv=None if clip is None else float(clip),
            sliding_window=None if window is None else int(window),
            rms_norm_eps=read_float(d, "rms_norm_eps", self.rms_norm_eps, lo=0, lo_open=True),
            rope_theta=theta,
            **extra,
        ) | (self.fields(d) if self.fields else {})  # family-specific fields override the generic ones


_QWEN = dict(expert_count_keys=("num_experts", "num_local_experts"), expert_size_key="moe_intermediate_size",
             moe_layers=sparse_step_layers, dense_size_key="intermediate_size", refused_flags=("use_sliding_window",))

_DEEPSEEK = dict(expert_count_keys=("n_routed_experts", "num_local_experts"), expert_size_key="moe_intermediate_size",
                 moe_layers=first_k_dense_layers, dense_size_key="intermediate_size",
                 shared_experts_key="n_shared_experts", route_weights_fp32=True, bias_key="attention_bias",
                 o_bias=True, attention="mla", router_fp32=True, yarn=True)
_DEEPSEEK_TINY = dict(intermediate_size=128, moe_intermediate_size=48, n_routed_experts=8, first_k_dense_replace=1,
                      num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                      v_head_dim=16, attention_bias=False, rms_norm_eps=1e-6, rope_theta=1e4)

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
    Family(
        "deepseek_v2", "DeepseekV2ForCausalLM", **_DEEPSEEK,
        norm_topk_prob=False,  # transformers' DeepseekV2 router never renormalises (its config key is unused)
        router="softmax", fields=deepseek_v2_fields,
        tiny_config=dict(_DEEPSEEK_TINY, q_lora_rank=None, n_shared_experts=2, topk_method="group_limited_greedy",
                         n_group=4, topk_group=2, routed_scaling_factor=1.0,
                         rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=512,
                                           beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707))),
    Family(
        "deepseek_v3", "DeepseekV3ForCausalLM", **_DEEPSEEK,
        norm_topk_default=True, router="sigmoid", fields=deepseek_v3_fields,
        tiny_config=dict(_DEEPSEEK_TINY, q_lora_rank=24, n_shared_experts=1, n_group=4, topk_group=2,
                         routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True,
                         num_nextn_predict_layers=1)),
    Family(
        "glm4_moe", "Glm4MoeForCausalLM",
        expert_count_keys=("n_routed_experts", "num_local_experts"), expert_size_key="moe_intermediate_size",
        moe_layers=first_k_dense_layers, dense_size_key="intermediate_size", shared_experts_key="n_shared_experts",
        norm_topk_default=True, route_weights_fp32=True, bias_key="attention_bias", router="sigmoid",
        router_fp32=True, partial_rotary_default=0.5, rms_norm_eps=1e-5, fields=glm4_moe_fields,
        tiny_config=dict(intermediate_size=128, moe_intermediate_size=48, n_routed_experts=8, n_shared_experts=1,
                         first_k_dense_replace=1, head_dim=16, n_group=2, topk_group=1, routed_scaling_factor=1.0,
                         norm_topk_prob=True, use_qk_norm=False, attention_bias=True, partial_rotary_factor=0.5,
                         rms_norm_eps=1e-5, rope_theta=1e4)),
    Family(
        "gpt_oss", "GptOssForCausalLM",
        expert_count_keys=("num_local_experts", "num_experts"), expert_size_key="intermediate_size",
        bias_key="attention_bias", bias_default=True, o_bias=True, sliding_window_key="sliding_window",
        attention_sinks=True, router="topk_softmax", router_bias=True, norm_weight_fp32=True,
        expert_activation="clamped_swiglu", expert_biases=True, yarn=True, rms_norm_eps=1e-5, rope_theta=150000.0,
        rope_defaults=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                           original_max_position_embeddings=4096),
        quantizations=("mxfp4",), fields=gpt_oss_fields,
        names=TensorNames(fused_weights=("gate_up_proj", "down_proj"), interleaved_gate_up=True,
                          aliases=((".mlp.gate.", ".mlp.router."),)),
        tiny_config=dict(intermediate_size=64, num_local_experts=8, head_dim=16, sliding_window=4, attention_bias=True,
                         swiglu_alpha=1.702, swiglu_limit=7.0, rms_norm_eps=1e-5,
                         rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0,
                                              beta_slow=1.0, truncate=False, original_max_position_embeddings=64))),
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
