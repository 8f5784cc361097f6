"""Bounds of a replay: the all-resident time and the best possible time at a budget.

- all-resident: every expert on the device, so no copies: the compute time.
- best possible: max(all-resident time, Belady's miss bytes / aggregate copy
  bandwidth), i.e. Belady eviction (fewest copies of any policy, prefetching
  or not) with a perfect prefetcher limited only by bandwidth: no latency,
  copies fully overlapped with compute. Computed, not simulated.

``belady_misses`` counts Belady's misses with a lazy max-heap of next uses:
O(accesses x log) instead of a scan of the cache per eviction. It follows the
runtime cache's rules (the experts of the (step, layer) being computed are
pinned; per-layer scope gives each layer an equal pool), so its count equals
``ExpertCache(policy="belady")`` without prefetch (tests check this). Among
experts never used again any victim gives the same count.

This module knows nothing about simpy or devices beyond the numbers it is given.
"""

from __future__ import annotations

import heapq
from typing import Sequence

NEVER = 1 << 62


def belady_misses(ids: Sequence[Sequence[Sequence[int]]], n_slots: int, scope: str, n_layers: int) -> int:
    """Belady's miss count for ``ids[step][layer]`` (experts in access order) with ``n_slots`` slots."""
    keys = [(l, e) for step in ids for l, layer_ids in enumerate(step) for e in layer_ids]
    nxt = [NEVER] * len(keys)  # index of the next access to the same key
    last: dict = {}
    for i in range(len(keys) - 1, -1, -1):
        nxt[i] = last.get(keys[i], NEVER)
        last[keys[i]] = i
    n_pools = 1 if scope == "global" else n_layers
    cap = n_slots // n_pools
    resident = [dict() for _ in range(n_pools)]  # key -> next use
    heaps: list[list] = [[] for _ in range(n_pools)]  # (-next use, key), lazily invalidated
    misses, i = 0, 0
    for step in ids:
        for l, layer_ids in enumerate(step):
            p = 0 if n_pools == 1 else l
            res, heap = resident[p], heaps[p]
            pinned = []
            for e in layer_ids:
                key = keys[i]
                if key not in res:
                    misses += 1
                    if len(res) >= cap:
                        held = []
                        while True:
                            neg, k = heapq.heappop(heap)
                            if res.get(k) != -neg:
                                continue  # stale entry
                            if k in pinned:
                                held.append((neg, k))
                                continue
                            del res[k]
                            break
                        for h in held:
                            heapq.heappush(heap, h)
                res[key] = nxt[i]
                heapq.heappush(heap, (-nxt[i], key))
                pinned.append(key)
                i += 1
    return misses


def bounds(ids, *, n_slots: int, scope: str, n_layers: int, expert_bytes: int, compute_s: float,
           n_tokens: int, h2d_bytes_per_s: float, copy_engines: int) -> dict:
    """The report's ``bounds`` entry (see the module docstring for the definitions)."""
    misses = belady_misses(ids, n_slots, scope, n_layers)
    best = max(compute_s, misses * expert_bytes / (h2d_bytes_per_s * copy_engines))
    return {"all_resident_s": compute_s, "all_resident_tokens_per_s": n_tokens / compute_s,
            "best_s": best, "best_tokens_per_s": n_tokens / best, "belady_misses": misses,
            "best_definition": "max(all-resident compute, Belady misses x expert bytes / aggregate H2D bandwidth)"}
