"""Bounds of a replay: the all-resident time and the best possible time at a budget.

- all-resident: every expert on the device, so no copies: the compute time.
- best possible, copy-only (``best_*``): max(all-resident time, Belady's miss
  bytes / aggregate copy bandwidth), i.e. Belady eviction (fewest copies of
  any policy, prefetching or not) with a perfect prefetcher limited only by
  bandwidth: no latency, copies fully overlapped with compute. Computed, not
  simulated. It is the best a run can do when every miss is copied.
- best possible, hybrid (``best_hybrid_*``): the same Belady misses M, each
  either copied (c = expert bytes / aggregate bandwidth) or computed on the host
  (h = the host profile's time for one expert at one token, its cheapest), the
  link and the host working in parallel with the device and with each other,
  perfectly balanced: max(all-resident time, M x c x h / (c + h)). It is the
  best the hybrid can do *with Belady's residency*: a policy that also skips
  caching some misses could miss less, so it is a figure to compare with, not a
  proven lower bound; with no host profile for the format it is left out.
- hybrid floor (``hybrid_floor_*``, ``hybrid_floor``; reported by runs that
  compute on the host): host compute also takes work off the device, so a
  hybrid run can beat the all-resident time and both figures above. The floor
  is proven for the replay's rule: each layer takes at least max(the device's
  time without the experts given to the host, the host's time for them),
  minimised over every choice of them (``CostModel.hybrid_floor_s``), plus
  each step's dense layers and head; copies and waits only add to it.

``belady_misses`` follows the runtime ``ExpertCache``'s rules with the
``belady`` policy and no prefetch exactly (tests/test_sim_bounds.py checks it
against the cache): a (step, layer)'s experts are all pinned while its misses
take slots, so a miss evicts the resident expert of *another* layer-step whose
next use is furthest away; per-layer scope runs one such pool per layer. It is
a vectorised next-use table plus one heap, not a cache replay.

``BoundsCache`` keeps the miss count on disk per (trace digest, slots, scope,
tokens, batch), one small JSON file each written through
``moe_runtime.core.outputs``, so the points of a sweep that share a budget compute
it once; ``bounds`` also memoises in the process. A stored count is validated
before it is trusted: its file must name its key and carry the digest of
(key, count) written with it, and the count must lie between the accesses'
distinct experts (every first access misses) and the accesses themselves;
anything else is recomputed and rewritten.

This module knows nothing about simpy or devices beyond the numbers it is given.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from itertools import chain
from pathlib import Path
from typing import Sequence

import numpy as np

from moe_runtime.core.errors import MoeError
from moe_runtime.core.outputs import write_json_atomic

DEFAULT_CACHE_DIR = "out/cache/bounds"
_VERSION = 1  # bump when the count's definition changes: old cache files are then not read
_MEMO: dict[str, int] = {}


def _flatten(ids, n_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys, group ends): key = layer * E + expert per access in order, and where each (step, layer) ends."""
    lens = [len(x) for step in ids for x in step]
    flat = np.fromiter(chain.from_iterable(chain.from_iterable(ids)), dtype=np.int64, count=sum(lens))
    n_moe_layers = len(ids[0]) if len(ids) else 0
    layer_of = np.repeat(np.tile(np.arange(n_moe_layers, dtype=np.int64), len(ids)), lens)
    return layer_of * n_experts + flat, np.cumsum(lens)


def _next_use(keys: np.ndarray) -> np.ndarray:
    """nxt[i] = the next position holding keys[i], or len(keys) (never again)."""
    n = len(keys)
    order = np.argsort(keys, kind="stable")
    nxt = np.full(n, n, dtype=np.int64)
    same = keys[order[1:]] == keys[order[:-1]]
    nxt[order[:-1][same]] = order[1:][same]
    return nxt


def belady_misses(ids: Sequence[Sequence[Sequence[int]]], n_slots: int, scope: str, n_moe_layers: int) -> int:
    """Belady's miss count for ``ids[step][layer]`` (experts in access order) with ``n_slots`` slots."""
    if scope not in ("global", "per-layer"):
        raise ValueError(f"cache scope must be 'global' or 'per-layer', not {scope!r}")
    if not len(ids):
        return 0
    n_experts = 1 + max((e for step in ids for x in step for e in x), default=0)
    keys_a, ends_a = _flatten(ids, n_experts)
    nxt = _next_use(keys_a).tolist()
    keys, ends = keys_a.tolist(), ends_a.tolist()
    n_pools = 1 if scope == "global" else n_moe_layers
    cap = n_slots // n_pools
    resident = bytearray(n_moe_layers * n_experts)
    prio = [0] * (n_moe_layers * n_experts)  # a resident key's next use; heap entries not matching it are stale
    heaps = [[] for _ in range(n_pools)]
    used = [0] * n_pools
    misses = 0
    push, pop = heapq.heappush, heapq.heappop
    start = 0
    for g, end in enumerate(ends):
        pool = 0 if n_pools == 1 else g % n_moe_layers
        heap = heaps[pool]
        group_missed = []
        for i in range(start, end):  # classify: hits move to their next use, misses wait for a slot
            k = keys[i]
            if resident[k]:
                prio[k] = nxt[i]
                push(heap, (-nxt[i], k))
            else:
                group_missed.append(i)
        if group_missed:
            pinned = set(keys[start:end])
            for i in group_missed:
                k = keys[i]
                if used[pool] < cap:
                    used[pool] += 1
                else:  # evict the furthest next use outside this layer-step (its experts are pinned)
                    held = []
                    while True:
                        p, v = pop(heap)
                        if not resident[v] or prio[v] != -p:
                            continue  # stale
                        if v in pinned:
                            held.append((p, v))
                            continue
                        resident[v] = 0
                        break
                    for item in held:
                        push(heap, item)
                resident[k] = 1
                prio[k] = nxt[i]
                push(heap, (-nxt[i], k))
            misses += len(group_missed)
        start = end
    return misses


def trace_digest(trace) -> str:
    """What a Belady count depends on in a trace: its routing and how tokens form sequences."""
    h = hashlib.sha256()
    for arr in (trace.expert_ids, trace.seq_id, trace.position):
        a = np.ascontiguousarray(arr)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:24]


class BoundsCache:
    """Belady miss counts on disk under ``directory``, one JSON file per key (see the module docstring)."""

    def __init__(self, directory=DEFAULT_CACHE_DIR) -> None:
        self.dir = Path(directory)

    @staticmethod
    def key(digest: str, n_slots: int, scope: str, tokens: int, batch: int) -> str:
        return f"v{_VERSION}-{digest}-{n_slots}-{scope}-{tokens}-{batch}"

    @staticmethod
    def _check(key: str, misses: int) -> str:
        return hashlib.sha256(f"{key}:{misses}".encode()).hexdigest()[:16]

    def get(self, key: str) -> int | None:
        """The stored count, or None when absent, unreadable or not what ``put`` wrote for ``key``."""
        try:
            d = json.loads((self.dir / f"{key}.json").read_text())
            v = d["belady_misses"]
            if d["key"] != key or d["check"] != self._check(key, v):
                return None  # edited, or copied from another key: computed again and rewritten
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            return None  # absent or unreadable: computed again and rewritten
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None

    def put(self, key: str, misses: int) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.dir / f"{key}.json", {"key": key, "belady_misses": misses,
                                                         "check": self._check(key, misses)})
        except (OSError, MoeError):
            pass  # a cache that cannot be written only costs time


def plausible_misses(ids, misses: int) -> bool:
    """Whether ``misses`` can be Belady's count for ``ids``: at least the distinct (layer, expert) keys (each
    first access misses: the cache starts empty) and at most the accesses."""
    if not len(ids):
        return misses == 0
    n_experts = 1 + max((e for step in ids for x in step for e in x), default=0)
    keys, ends = _flatten(ids, n_experts)
    distinct = int(np.count_nonzero(np.bincount(keys))) if len(keys) else 0
    return distinct <= misses <= len(keys)


def cached_belady_misses(ids, *, n_slots: int, scope: str, n_moe_layers: int, key: str | None = None,
                         cache: BoundsCache | None = None) -> int:
    """``belady_misses`` through the process memo and, when given, the disk cache (both by ``key``)."""
    if key is not None and key in _MEMO:
        return _MEMO[key]
    misses = cache.get(key) if cache is not None and key is not None else None
    if misses is not None and not plausible_misses(ids, misses):
        misses = None  # a count this trace cannot have: recomputed, and the file rewritten
    if misses is None:
        misses = belady_misses(ids, n_slots, scope, n_moe_layers)
        if cache is not None and key is not None:
            cache.put(key, misses)
    if key is not None:
        _MEMO[key] = misses
    return misses


def bounds(ids, *, n_slots: int, scope: str, n_moe_layers: int, expert_bytes: int, compute_s: float,
           n_tokens: int, h2d_bytes_per_s: float, copy_engines: int, key: str | None = None,
           cache: BoundsCache | None = None, host_expert_s: float | None = None) -> dict:
    """The report's ``bounds`` entry (see the module docstring for the definitions)."""
    misses = cached_belady_misses(ids, n_slots=n_slots, scope=scope, n_moe_layers=n_moe_layers, key=key, cache=cache)
    c = expert_bytes / (h2d_bytes_per_s * copy_engines)
    best = max(compute_s, misses * c)
    out = {"all_resident_s": compute_s, "all_resident_tokens_per_s": n_tokens / compute_s,
           "best_s": best, "best_tokens_per_s": n_tokens / best, "belady_misses": misses,
           "best_definition": "copy-only: max(all-resident compute, Belady misses x expert bytes / aggregate H2D "
                              "bandwidth)"}
    if host_expert_s is not None:
        h = host_expert_s
        hybrid = max(compute_s, misses * c * h / (c + h))
        out.update(best_hybrid_s=hybrid, best_hybrid_tokens_per_s=n_tokens / hybrid,
                   best_hybrid_definition="hybrid: max(all-resident compute, Belady misses x c x h / (c + h)), "
                                          "c = one copy at aggregate bandwidth, h = the host's time for one expert "
                                          "at one token; with Belady's residency")
    return out


def hybrid_floor(cost, w, host_s) -> dict:
    """The proven bound of a run that computes experts on the host (``CostModel.hybrid_floor_s`` of the
    workload ``w``; ``host_s(n)``: the host's seconds for one expert at n tokens)."""
    floor = cost.hybrid_floor_s(w.n_tokens, w.ctx_sum, w.n_unique, w.counts, host_s)
    return {"hybrid_floor_s": floor, "hybrid_floor_tokens_per_s": int(w.n_tokens.sum()) / floor,
            "hybrid_floor_definition": "host compute: per layer, the least over every set of experts given to the "
                                       "host of max(device time without them, host time for them), plus the "
                                       "per-step dense layers and head; no copies, no waits"}
