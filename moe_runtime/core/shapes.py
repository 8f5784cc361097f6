"""ModelSpec: the shapes of an MoE model needed for cost models and trace metadata.

Contract: ``load_model_spec(name_or_path)`` reads ``configs/models/<name>.yaml``
(relative to the repository that holds this package) or a YAML path and returns
a validated frozen ``ModelSpec``; ``ModelSpec.from_hf_config(d)`` builds one
from a Hugging Face config.json dict, parsed by ``ModelConfig.from_hf_dict``
(the families' one parser) and derived from the result by ``from_config``.
Errors raise ``MoeError`` naming the file and field.

An expert's bytes come from its format (``format_sizes``): ``expert_dtype``
(default: ``dtype``) may be ``int8``, ``int4`` or ``mxfp4`` as well as a
float dtype; ``expert_biases`` adds GPT-OSS's three bias vectors (in
``dtype`` for quantized experts). ``with_expert_dtype(name)`` is the same
model with its experts stored otherwise (``moe-sim replay --expert-dtype``).

The derived sizes and FLOP counts assume SwiGLU experts (three matrices),
grouped-query attention with q/k/v/o projections, untied input and output
embeddings, and batch size 1. This module knows nothing about weights, tensors
or devices; it does not read config.json files itself.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields, replace

from moe_runtime.core import config_files
from moe_runtime.core.model_config import ModelConfig
from moe_runtime.core.errors import MoeError
from moe_runtime.core.format_sizes import CODECS, PLAIN, expert_nbytes

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8": 1}


@dataclass(frozen=True)
class ModelSpec:
    """One MoE decoder's shape. ``n_layers`` counts all decoder layers, ``n_moe_layers`` the MoE ones."""

    name: str
    n_layers: int
    moe_layers: tuple[int, ...]  # model layer indices with a sparse MoE block
    n_experts: int
    top_k: int
    hidden_size: int
    moe_intermediate_size: int  # intermediate size of one routed expert
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: str
    n_shared_experts: int = 0
    shared_intermediate_size: int = 0  # total intermediate of all shared experts together
    dense_intermediate_size: int = 0  # MLP of the non-MoE layers
    expert_dtype: str = ""  # how routed experts are stored and moved ("" = dtype); see the module docstring
    expert_biases: bool = False  # GPT-OSS: b1, b3, b2 per expert

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise MoeError(f"name must be a non-empty string, got {self.name!r}")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "int" and (not isinstance(v, int) or isinstance(v, bool)):
                raise MoeError(f"{f.name} must be an integer, got {v!r}")
        for name in ("n_layers", "n_experts", "top_k", "hidden_size", "moe_intermediate_size",
                     "n_heads", "n_kv_heads", "head_dim", "vocab_size"):
            if getattr(self, name) < 1:
                raise MoeError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_shared_experts", "shared_intermediate_size", "dense_intermediate_size"):
            if getattr(self, name) < 0:
                raise MoeError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.top_k > self.n_experts:
            raise MoeError(f"top_k={self.top_k} exceeds n_experts={self.n_experts}")
        if self.n_heads % self.n_kv_heads:
            raise MoeError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.dtype not in DTYPE_BYTES:
            raise MoeError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if not isinstance(self.expert_dtype, str) or self.expert_dtype not in ("", self.dtype, *CODECS):
            raise MoeError(f"expert_dtype must be one of {', '.join(CODECS)}, got {self.expert_dtype!r}")
        if not isinstance(self.expert_biases, bool):
            raise MoeError(f"expert_biases must be true or false, got {self.expert_biases!r}")
        if not isinstance(self.moe_layers, tuple) or not self.moe_layers:
            raise MoeError("moe_layers must be a non-empty tuple of layer indices")
        if any(not isinstance(i, int) or isinstance(i, bool) for i in self.moe_layers):
            raise MoeError(f"moe_layers must hold integers, got {self.moe_layers!r}")
        if list(self.moe_layers) != sorted(set(self.moe_layers)):
            raise MoeError(f"moe_layers must be strictly increasing, got {list(self.moe_layers)}")
        if self.moe_layers[0] < 0 or self.moe_layers[-1] >= self.n_layers:
            raise MoeError(f"moe_layers must lie in [0, {self.n_layers}), got {list(self.moe_layers)}")
        if (self.n_shared_experts > 0) != (self.shared_intermediate_size > 0):
            raise MoeError("n_shared_experts and shared_intermediate_size must be both zero or both positive")
        if self.n_moe_layers < self.n_layers and self.dense_intermediate_size == 0:
            raise MoeError("dense_intermediate_size is needed: the model has non-MoE layers")

    # ---- sizes -------------------------------------------------------------------------
    @property
    def n_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def dense_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layers) if i not in set(self.moe_layers))

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.moe_intermediate_size  # gate, up, down

    @property
    def expert_bytes(self) -> int:
        """Bytes of one routed expert as stored and copied, in its format."""
        codec = self.expert_dtype or self.dtype
        if codec not in CODECS:  # float8: no packed format of ours, counted per weight
            return (self.expert_params + (2 * self.moe_intermediate_size + self.hidden_size) * self.expert_biases) \
                * self.dtype_bytes
        bias = (codec if codec in PLAIN else self.dtype) if self.expert_biases else None
        if bias is not None and bias not in PLAIN:
            raise MoeError(f"expert biases in {bias} are not supported")
        return expert_nbytes(codec, self.hidden_size, self.moe_intermediate_size, bias)

    def with_expert_dtype(self, expert_dtype: str | None) -> "ModelSpec":
        """The same model with experts stored as ``expert_dtype`` (None: unchanged)."""
        return self if expert_dtype is None else replace(self, expert_dtype=expert_dtype)

    @property
    def total_expert_bytes(self) -> int:
        """All routed experts of all MoE layers: what offloading keeps off the GPU."""
        return self.expert_bytes * self.n_experts * self.n_moe_layers

    @property
    def attention_params(self) -> int:
        H, hd = self.hidden_size, self.head_dim
        return H * self.n_heads * hd * 2 + H * self.n_kv_heads * hd * 2  # q and o, k and v

    @property
    def dense_bytes_per_layer(self) -> int:
        """Resident bytes of one MoE layer besides its routed experts.

        Attention, shared experts, two RMSNorms and the router.
        """
        H = self.hidden_size
        params = (self.attention_params + 3 * H * self.shared_intermediate_size + 2 * H
                  + H * self.n_experts)
        return params * self.dtype_bytes

    @property
    def dense_layer_bytes(self) -> int:
        """Bytes of one non-MoE decoder layer (attention, dense SwiGLU MLP, norms)."""
        H = self.hidden_size
        return (self.attention_params + 3 * H * self.dense_intermediate_size + 2 * H) * self.dtype_bytes

    @property
    def embedding_bytes(self) -> int:
        """Input embedding plus (untied) output head plus the final norm."""
        return (2 * self.vocab_size * self.hidden_size + self.hidden_size) * self.dtype_bytes

    @property
    def resident_bytes(self) -> int:
        """Everything except routed experts: the GPU's fixed cost when experts are offloaded."""
        return (self.embedding_bytes + self.n_moe_layers * self.dense_bytes_per_layer
                + len(self.dense_layers) * self.dense_layer_bytes)

    @property
    def total_bytes(self) -> int:
        return self.resident_bytes + self.total_expert_bytes

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token adds across all layers."""
        return 2 * self.n_kv_heads * self.head_dim * self.dtype_bytes * self.n_layers

    # ---- FLOPs per token (multiply-add = 2 FLOPs) ---------------------------------------
    def attention_flops_per_token(self, context_len: int) -> int:
        """One layer's attention for one new token attending to ``context_len`` positions."""
        if context_len < 0:
            raise MoeError(f"context_len must be >= 0, got {context_len}")
        projections = 2 * self.attention_params
        scores = 2 * 2 * self.n_heads * self.head_dim * context_len  # q.k^T and p.v
        return projections + scores

    @property
    def expert_flops_per_token(self) -> int:
        """One routed expert applied to one token."""
        return 2 * self.expert_params

    @property
    def moe_dense_flops_per_token(self) -> int:
        """Shared experts plus router of one MoE layer."""
        H = self.hidden_size
        return 2 * 3 * H * self.shared_intermediate_size + 2 * H * self.n_experts

    def moe_layer_flops_per_token(self, context_len: int) -> int:
        """Everything one MoE layer computes for one token (top_k routed experts)."""
        return (self.attention_flops_per_token(context_len) + self.moe_dense_flops_per_token
                + self.top_k * self.expert_flops_per_token)

    @classmethod
    def from_config(cls, cfg: ModelConfig, name: str, dtype: str) -> "ModelSpec":
        """The spec of a parsed model config, its weights stored as ``dtype`` (experts: MXFP4 when the
        checkpoint quantizes them so).

        One gated shared expert counts as one shared expert; ``dense_intermediate_size``
        is kept only when some layer is dense, as the YAML specs write it.
        """
        shared = cfg.shared_expert_intermediate_size
        return cls(name=name, n_layers=cfg.n_layers, moe_layers=cfg.moe_layers, n_experts=cfg.n_experts,
                   top_k=cfg.top_k, hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.moe_intermediate_size,
                   n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                   vocab_size=cfg.vocab_size, dtype=dtype, n_shared_experts=1 if shared else 0,
                   shared_intermediate_size=shared,
                   dense_intermediate_size=cfg.dense_intermediate_size if cfg.n_moe_layers < cfg.n_layers else 0,
                   expert_dtype=cfg.quantization or "", expert_biases=cfg.expert_biases)

    @classmethod
    def from_hf_config(cls, d: dict, name: str | None = None) -> "ModelSpec":
        """Build from a HF config.json dict of a family in ``FAMILIES``: parsed once by ``ModelConfig``."""
        cfg = ModelConfig.from_hf_dict(d)
        dtype = d.get("torch_dtype") or d.get("dtype")
        if dtype is None:
            raise MoeError(f"HF config ({cfg.model_type}) is missing field 'torch_dtype' (or 'dtype')")
        return cls.from_config(cfg, name or d.get("_name_or_path") or cfg.model_type, str(dtype))


_FIELDS = {f.name for f in fields(ModelSpec)}
# upper limits of the YAML form's integers: far above any real model, low enough that sizes derived
# from them (moe_layers, byte counts) stay small; n_experts as expert ids fit int16 in traces
_YAML_LIMITS = {"n_layers": 4096, "first_moe_layer": 4095, "n_experts": 32767, "top_k": 32767,
                "hidden_size": 1 << 20, "moe_intermediate_size": 1 << 22, "n_heads": 4096, "n_kv_heads": 4096,
                "head_dim": 1 << 16, "vocab_size": 1 << 24, "n_shared_experts": 1024,
                "shared_intermediate_size": 1 << 24, "dense_intermediate_size": 1 << 24}


def model_spec_from_dict(d: dict) -> ModelSpec:
    """Build from the YAML form: ``moe_layers: [..]`` or ``first_moe_layer: k``; head_dim and
    n_kv_heads may be left out (hidden/heads, and n_heads)."""
    if not isinstance(d, dict):
        raise MoeError("model spec must be a mapping of field: value")
    d = dict(d)
    for k, hi in _YAML_LIMITS.items():  # before any size is derived from them
        if k in d:
            lo = 0 if k in ("first_moe_layer", "n_shared_experts", "shared_intermediate_size",
                            "dense_intermediate_size") else 1
            config_files.check_number(k, d[k], lo=lo, hi=hi, integer=True)
    if "moe_layers" in d and "first_moe_layer" in d:
        raise MoeError("give either moe_layers or first_moe_layer, not both")
    if "first_moe_layer" in d:
        k, n = d.pop("first_moe_layer"), d.get("n_layers")
        if not isinstance(k, int) or not isinstance(n, int):
            raise MoeError("first_moe_layer and n_layers must be integers")
        d["moe_layers"] = list(range(k, n))
    unknown = sorted(set(map(str, d)) - _FIELDS)
    if unknown:
        raise MoeError(f"unknown field(s): {config_files.names(unknown)}")
    required = [f.name for f in fields(ModelSpec) if f.default is MISSING
                and f.name not in ("head_dim", "n_kv_heads", "moe_layers")]
    missing = [n for n in required if n not in d]
    if "moe_layers" not in d:
        missing.append("moe_layers (or first_moe_layer)")
    if missing:
        raise MoeError(f"missing field(s): {', '.join(missing)}")
    d.setdefault("n_kv_heads", d["n_heads"])
    if "head_dim" not in d:
        if not isinstance(d["hidden_size"], int) or not isinstance(d["n_heads"], int) or d["n_heads"] < 1:
            raise MoeError("hidden_size and n_heads must be integers")
        d["head_dim"] = d["hidden_size"] // d["n_heads"]
    if not isinstance(d["moe_layers"], (list, tuple)):
        raise MoeError(f"moe_layers must be a list of layer indices, got {config_files.short(d['moe_layers'])}")
    d["moe_layers"] = tuple(d["moe_layers"])
    return ModelSpec(**d)


def available_models() -> list[str]:
    return config_files.available(config_files.MODELS_DIR)


def load_model_spec(name_or_path) -> ModelSpec:
    """A name in configs/models/ (e.g. "mixtral-8x7b") or a path to a YAML file."""
    return config_files.load_yaml(config_files.resolve(name_or_path, config_files.MODELS_DIR, "model", "model spec"), model_spec_from_dict)
