"""Expert-cache budgets: parse what the user typed, fit a run into it, and refuse one too small to run.

A budget is given as bytes (``4GiB``, ``512MiB``, ``2GB``), a share of all
experts' bytes (``25%``), a plain count of experts (``48``), or ``fit`` /
``fit:80%``: a share (default all) of the device memory left after the dense
weights, the KV cache and the workspace (``core/memory.py``; the caller passes
that as ``free_bytes``). It becomes a number of expert slots.

The rule (``fit_budget``; the executor follows it, the design document quotes it):

- A *pool* is the slots one layer may use: every slot with ``global`` scope,
  an equal share (slots // MoE layers) with ``per-layer``.
- A decode step's layer needs its *union* at once: U = min(B x top-k, experts)
  for a batch of B sequences (one sequence: its top-k).
- Prefetches in flight get what the union leaves: the in-flight cap is
  min(--max-inflight, pool - U), never below 0. The prefetch depth shrinks
  first; at 0 nothing is prefetched (the predictor still runs).
- One provider call (a *wave*) holds at most pool - in-flight cap experts. A
  larger union, a long prompt's or a batch's beyond the pool, is served in
  waves of that many experts in ascending id order, in the prefill and in
  decode alike; every expert still sees all its tokens and the sums keep
  their order, so the tokens equal one call's.
- Refused (one MoeError, before anything runs) only when a pool is below one
  token's top-k: slots < top-k with ``global`` scope, slots < top-k x MoE
  layers with ``per-layer``.

``check_budget`` is the older, stricter rule (the union plus the full
in-flight cap must fit) that the simulator still applies: it replays no waves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moe_runtime.core.errors import MoeError
from moe_runtime.core.config_files import short

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text, what: str = "size") -> int:
    """``4GiB``, ``512MiB``, ``2GB``, ``1000`` -> bytes; MoeError naming ``what`` otherwise."""
    s = str(text).strip().lower().replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgt]i?b|b)?", s)
    if not m:
        raise MoeError(f"cannot read {what} {text!r}: give bytes (512MiB, 1GiB, 2GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def is_fit(text) -> bool:
    """Whether ``text`` is a ``fit`` budget (a share of the memory left after the fixed terms)."""
    return str(text).strip().lower().replace(" ", "").split(":", 1)[0] == "fit"


def parse_budget(text: str, *, expert_bytes: int, total_experts: int, free_bytes: int | None = None) -> int:
    """Number of expert slots the budget ``text`` buys; ``free_bytes``: the device memory left for experts,
    which ``fit`` budgets need. A count over all experts or a share over 100% is refused; bytes (and
    ``fit``) beyond all experts' bytes buy all experts (the run's budget line says how many)."""
    s = str(text).strip().lower().replace(" ", "")
    if not s:
        raise MoeError("budget is empty: give bytes (4GiB, 512MiB), a share (25%) or a count of experts (48)")
    if s.startswith("-"):
        raise MoeError(f"budget {short(text)} is negative: give bytes (4GiB), a share (25%) or a count (48)")
    if len(s) > 40:  # checked before int()/float() see it: a 5,000-digit number is no budget
        raise MoeError(f"budget {short(text)} is {len(s):,} characters long: give bytes (4GiB, 512MiB), a share "
                       "(25%) or a count of experts (48)")
    if m := re.fullmatch(r"fit(?::(\d+(?:\.\d+)?)%)?", s):
        pct = float(m.group(1) or 100)
        if not 0 < pct <= 100:
            raise MoeError(f"budget {text!r}: the share must be in (0, 100]%")
        if free_bytes is None:
            raise MoeError(f"budget {text!r} needs the device's memory; give bytes, a share or a count here")
        slots = int(max(free_bytes, 0) * pct / 100.0) // expert_bytes
    elif re.fullmatch(r"\d+", s):
        slots = int(s)
        if slots > total_experts:  # as a share over 100%: a count is exact, so more than exist is a mistake
            raise MoeError(f"budget {text!r} is more experts than the model has ({total_experts:,}); give at most "
                           f"{total_experts:,} or 100%")
    elif m := re.fullmatch(r"(\d+(?:\.\d+)?)%", s):
        pct = float(m.group(1))
        if pct > 100:
            raise MoeError(f"budget {text!r} is over 100% of the experts")
        slots = int(total_experts * pct / 100.0)
    elif m := re.fullmatch(r"(\d+(?:\.\d+)?)([kmgt]i?b|b)", s):
        slots = int(float(m.group(1)) * _UNITS[m.group(2)] // expert_bytes)
    else:
        raise MoeError(f"cannot read budget {short(text)}: give bytes (4GiB, 512MiB), a share (25%), a count of "
                       "experts (48) or fit / fit:80% (a share of the device memory left for experts)")
    return min(slots, total_experts)  # bytes or fit beyond all experts: all of them


def layer_demand(*, top_k: int, batch: int, n_experts: int) -> int:
    """Slots one layer of a step may need at once: a batch's union, min(B x top-k, experts)."""
    return min(batch * top_k, n_experts)


def wave_capacity(*, n_slots: int, scope: str, n_moe_layers: int, max_inflight: int, prefetching: bool) -> int:
    """The most distinct experts one layer may hold at once (its pool less the in-flight prefetch slots);
    a step whose union is larger (a long prompt) gets its experts in waves of this many, in id order."""
    pool = n_slots if scope == "global" else n_slots // n_moe_layers
    return pool - (max_inflight if prefetching else 0)


def minimum_slots(*, experts_per_layer: int, max_inflight: int, prefetching: bool,
                  scope: str, n_moe_layers: int) -> int:
    """The smallest slot count that can run: one layer's experts plus in-flight prefetches."""
    per_pool = experts_per_layer + (max_inflight if prefetching else 0)
    return per_pool * (n_moe_layers if scope == "per-layer" else 1)


@dataclass(frozen=True)
class BudgetFit:
    """How a run fits its slots (``fit_budget``): what the cache, the prefetcher and the waves use."""

    n_slots: int
    pool: int  # slots one layer may use
    union: int  # experts a decode step's layer needs at once: min(B x top-k, experts)
    inflight: int  # the prefetch cap the run uses: min(max_inflight, pool - union), at least 0
    capacity: int  # experts one provider call holds (pool - inflight when prefetching); more come in waves

    @property
    def decode_waves(self) -> bool:
        """Whether a decode step's union is served in waves (it exceeds ``capacity``)."""
        return self.union > self.capacity


def fit_budget(n_slots: int, *, top_k: int, batch: int, n_experts: int, max_inflight: int, prefetching: bool,
               scope: str, n_moe_layers: int, expert_bytes: int) -> BudgetFit:
    """Fit a run of ``batch`` sequences into ``n_slots`` by the module's rule; MoeError below one token's top-k."""
    pool = n_slots if scope == "global" else n_slots // n_moe_layers
    if pool < top_k:
        need = top_k * (n_moe_layers if scope == "per-layer" else 1)
        what = f"one token's top-{top_k} experts per layer"
        if scope == "per-layer":
            what += f", times {n_moe_layers} layers for per-layer scope"
        raise MoeError(
            f"expert budget of {n_slots} experts ({n_slots * expert_bytes:,} bytes) is below the minimum of "
            f"{need} experts ({need * expert_bytes:,} bytes): {what}")
    union = layer_demand(top_k=top_k, batch=batch, n_experts=n_experts)
    inflight = max(0, min(max_inflight, pool - union))
    capacity = wave_capacity(n_slots=n_slots, scope=scope, n_moe_layers=n_moe_layers, max_inflight=inflight,
                             prefetching=prefetching)
    return BudgetFit(n_slots, pool, union, inflight, capacity)


def check_budget(n_slots: int, *, experts_per_layer: int, max_inflight: int, prefetching: bool,
                 scope: str, n_moe_layers: int, expert_bytes: int, batch: int = 1) -> None:
    """Raise MoeError naming the minimum in bytes and experts when ``n_slots`` is below the union plus the
    full in-flight cap (the simulator's rule; the executor fits with ``fit_budget``)."""
    need = minimum_slots(experts_per_layer=experts_per_layer, max_inflight=max_inflight,
                         prefetching=prefetching, scope=scope, n_moe_layers=n_moe_layers)
    if n_slots < need:
        what = f"{experts_per_layer} experts per layer"
        if batch > 1:
            what += f" (the union of {batch} sequences' top-k)"
        if prefetching:
            what += f" + {max_inflight} in flight"
        if scope == "per-layer":
            what += f", times {n_moe_layers} layers for per-layer scope"
        raise MoeError(
            f"expert budget of {n_slots} experts ({n_slots * expert_bytes:,} bytes) is below the minimum of "
            f"{need} experts ({need * expert_bytes:,} bytes): {what}")
