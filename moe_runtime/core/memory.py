"""Device memory: what a run needs besides its expert budget, and whether the budget fits.

Contract: a run on a device of ``device_bytes`` needs

    dense weights + KV cache + workspace + expert budget <= device_bytes

- dense weights (``dense_weight_bytes``): every weight but the routed experts:
  embeddings and head, attention (MLA's low-rank projections as stored, when
  the spec has ``kv_lora_rank``), shared experts, dense MLPs, norms, routers;
- KV cache (``kv_cache_bytes``) for ``batch`` sequences of ``context`` positions:
  per layer and position the latent (kv_lora_rank + qk_rope_head_dim values)
  for MLA, keys and values of every KV head otherwise; a sliding-window layer
  keeps at most its window; in the model's dtype;
- workspace: what the run states (``--workspace``: CUDA context, activations,
  kernel workspace), a number, not modelled.

``MemoryPlan.check`` refuses a budget that does not fit with one line naming
every term; ``free_for_experts`` is what ``fit`` budgets share out (budget.py).
This module knows shapes and numbers only: no devices files, no torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moe_runtime.core.errors import MoeError
from moe_runtime.core.shapes import ModelSpec


class DoesNotFit(MoeError):
    """A budget that cannot fit beside the run's fixed terms (sweeps refuse it before any point runs)."""


def dense_weight_bytes(spec: ModelSpec) -> int:
    """Bytes of every weight except the routed experts, as resident on the device."""
    H = spec.hidden_size
    attn = spec.attention_weight_params
    norms = 2 * H
    moe_layer = attn + 3 * H * spec.shared_intermediate_size + norms + H * spec.n_experts
    dense_layer = attn + 3 * H * spec.dense_intermediate_size + norms
    params = spec.n_moe_layers * moe_layer + len(spec.dense_layers) * dense_layer
    return params * spec.dtype_bytes + spec.embedding_bytes


def kv_cache_bytes(spec: ModelSpec, *, context: int, batch: int) -> int:
    """KV cache of ``batch`` sequences of ``context`` positions each (sliding layers capped at the window)."""
    if context < 1 or batch < 1:
        raise MoeError(f"context and batch must be >= 1, got {context} and {batch}")
    sliding = set(spec.sliding_layers)
    positions = sum(min(context, spec.sliding_window) if layer in sliding else context
                    for layer in range(spec.n_layers))
    return batch * positions * spec.kv_bytes_per_position


@dataclass(frozen=True)
class MemoryPlan:
    """The fixed terms of one run's device memory, in bytes."""

    device_name: str
    device_bytes: int
    dense_bytes: int
    kv_bytes: int
    workspace_bytes: int
    context: int
    batch: int

    @property
    def free_for_experts(self) -> int:
        """What is left for the expert budget (negative when the fixed terms alone do not fit)."""
        return self.device_bytes - self.dense_bytes - self.kv_bytes - self.workspace_bytes

    def fits(self, budget_bytes: int) -> bool:
        return budget_bytes <= self.free_for_experts

    def check(self, budget_bytes: int, budget: str) -> None:
        """MoeError, one line with every term, when ``budget_bytes`` does not fit."""
        if self.fits(budget_bytes):
            return
        need = self.device_bytes - self.free_for_experts + budget_bytes
        raise DoesNotFit(
            f"expert budget {budget} does not fit on {self.device_name}: dense weights {_gb(self.dense_bytes)} + "
            f"KV cache {_gb(self.kv_bytes)} (context {self.context} x batch {self.batch}) + workspace "
            f"{_gb(self.workspace_bytes)} + experts {_gb(budget_bytes)} = {_gb(need)} > device memory "
            f"{_gb(self.device_bytes)} (at most {_gb(max(self.free_for_experts, 0))} for experts; try fit or fit:N%)")

    def as_dict(self) -> dict:
        return {**asdict(self), "free_for_experts": self.free_for_experts}


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def memory_plan(spec: ModelSpec, *, device_name: str, device_bytes: int, context: int, batch: int,
                workspace_bytes: int) -> MemoryPlan:
    return MemoryPlan(device_name, int(device_bytes), dense_weight_bytes(spec),
                      kv_cache_bytes(spec, context=context, batch=batch), int(workspace_bytes), context, batch)
