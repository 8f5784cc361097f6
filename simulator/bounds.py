"""Bounds of a replay: the all-resident time and the best possible time at a budget.

- all-resident: every expert on the device, so no copies: the compute time.
- best possible: max(all-resident time, Belady's miss bytes / aggregate copy
  bandwidth), i.e. Belady eviction (fewest copies of any policy, prefetching
  or not) with a perfect prefetcher limited only by bandwidth: no latency,
  copies fully overlapped with compute. Computed, not simulated.

``belady_misses`` runs the runtime's own ``ExpertCache`` with the ``belady``
policy and no prefetch, so the bound follows exactly the cache's rules
(pinning, per-layer pools) that the replay uses.

This module knows nothing about simpy or devices beyond the numbers it is given.
"""

from __future__ import annotations

from typing import Sequence

from moe_runtime.cache.expert_cache import ExpertCache, Outcome, access_sequence


def belady_misses(ids: Sequence[Sequence[Sequence[int]]], n_slots: int, scope: str, n_layers: int) -> int:
    """Belady's miss count for ``ids[step][layer]`` (experts in access order) with ``n_slots`` slots."""
    per_layer = max((len(layer_ids) for step in ids for layer_ids in step), default=1)
    cache = ExpertCache(n_slots=n_slots, n_layers=n_layers, n_experts=1 + max(
        (e for step in ids for layer_ids in step for e in layer_ids), default=0),
        experts_per_layer=per_layer, expert_bytes=0, policy="belady", scope=scope, future=access_sequence(ids))
    for step in ids:
        cache.begin_step()
        for layer, layer_ids in enumerate(step):
            for _, slot, outcome in cache.access_layer(layer, layer_ids).outcomes:
                if outcome == Outcome.MISS:
                    cache.copy_done(slot)  # no clock here: a copy completes before the compute needs it
            cache.release_layer()
    return cache.finish().misses


def bounds(ids, *, n_slots: int, scope: str, n_layers: int, expert_bytes: int, compute_s: float,
           n_tokens: int, h2d_bytes_per_s: float, copy_engines: int) -> dict:
    """The report's ``bounds`` entry (see the module docstring for the definitions)."""
    misses = belady_misses(ids, n_slots, scope, n_layers)
    best = max(compute_s, misses * expert_bytes / (h2d_bytes_per_s * copy_engines))
    return {"all_resident_s": compute_s, "all_resident_tokens_per_s": n_tokens / compute_s,
            "best_s": best, "best_tokens_per_s": n_tokens / best, "belady_misses": misses,
            "best_definition": "max(all-resident compute, Belady misses x expert bytes / aggregate H2D bandwidth)"}
