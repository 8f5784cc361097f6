"""A model with real shapes and random weights, built in memory (no checkpoint file, no download).

Contract:

- ``config_from_spec(spec, n_moe_layers=None) -> ModelConfig`` maps a
  ``ModelSpec`` (configs/models/*.yaml) to the runtime's config. The family is
  ``families.synthetic_family``'s pick (a spec with shared experts becomes
  qwen2_moe, with one gated shared MLP of the spec's total shared intermediate
  size; ``olmoe*`` olmoe, ``mixtral*`` mixtral, anything else qwen3_moe), with
  that family's default switches (as its config.json would give with no
  optional fields). MLA attention (DeepSeek) is replaced by the spec's
  plain-attention approximation. ``n_moe_layers`` keeps only the first layers
  of the model, up to that many MoE layers, so a big model fits a small machine.
- ``synthetic_model(cfg, device, dtype, seed)`` builds ``(Transformer, HostExpertStore)``
  with seeded random weights (dense weights on ``device``, experts in the host
  store, pinned when CUDA is available), scaled so activations stay O(1).
  Experts are rotations of one random expert, so building is memcpy-fast;
  each expert's bytes still differ, so a wrong slot shows in the outputs.

The routing of such a model is meaningless; runs force it from a real trace.
"""

from __future__ import annotations

import torch

from moe_runtime.core.model_config import ModelConfig
from moe_runtime.core.errors import MoeError
from moe_runtime.model.experts import ExpertLayout, HostExpertStore
from moe_runtime.core.families import synthetic_family
from moe_runtime.model.transformer import Transformer
from moe_runtime.core.shapes import ModelSpec


def config_from_spec(spec: ModelSpec, n_moe_layers: int | None = None) -> ModelConfig:
    moe = list(spec.moe_layers)
    if n_moe_layers is not None:
        if n_moe_layers < 1:
            raise MoeError(f"need at least one MoE layer, got {n_moe_layers}")
        moe = moe[:n_moe_layers]
    n_layers = moe[-1] + 1
    fam = synthetic_family(spec.name, spec.shared_intermediate_size > 0)
    if fam.dense_size_key is None and moe != list(range(n_layers)):
        raise MoeError(f"a {fam.model_type}-family spec must have every layer MoE")
    return ModelConfig(
        model_type=fam.model_type, vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, n_layers=n_layers,
        n_heads=spec.n_heads, n_kv_heads=spec.n_kv_heads, head_dim=spec.head_dim, n_experts=spec.n_experts,
        top_k=spec.top_k, moe_intermediate_size=spec.moe_intermediate_size, moe_layers=tuple(moe),
        dense_intermediate_size=spec.dense_intermediate_size,
        shared_expert_intermediate_size=spec.shared_intermediate_size,
        max_position_embeddings=4096, **fam.switches({}))


@torch.no_grad()
def synthetic_model(cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                    seed: int = 0) -> tuple[Transformer, HostExpertStore]:
    """Random dense weights on ``device`` and random experts in a host store; see the module docstring."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(cfg)
    state = {}
    for name, p in model.state_dict().items():
        if "norm" in name:
            t = torch.ones(p.shape)
        elif p.dim() == 1:  # biases
            t = torch.zeros(p.shape)
        else:
            t = torch.randn(p.shape, generator=gen) * (p.shape[-1] ** -0.5)
        state[name] = t.to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True, strict=True)
    model.eval().requires_grad_(False)
    layout = ExpertLayout(cfg.hidden_size, cfg.moe_intermediate_size, dtype)
    model.expert_format = layout  # the experts compute in the store's format, as load_model sets it
    store = HostExpertStore(layout, cfg.n_experts, cfg.top_k, cfg.moe_layers)
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    base = torch.randn(layout.numel, generator=gen)  # one random expert; the others are rotations of it
    base[: 2 * h * i] *= h ** -0.5  # w1, w3 read the hidden state
    base[2 * h * i:] *= i ** -0.5  # w2 reads the intermediate (scales mix a little under rotation: harmless)
    base = base.to(dtype)
    for m in range(store.n_moe_layers):
        buf = store.layer_buffer(m)  # [E, numel]
        for e in range(cfg.n_experts):  # distinct bytes per expert, at memcpy speed rather than randn's
            shift = (m * cfg.n_experts + e) * 7919 % layout.numel
            buf[e, shift:].copy_(base[: layout.numel - shift])
            buf[e, :shift].copy_(base[layout.numel - shift:])
    return model, store
