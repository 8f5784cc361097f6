"""Bookkeeping of the device expert cache: which expert is in which slot, and in what state.

This module moves no bytes and reads no clock. The executor (real copies on
CUDA streams or a copy thread) and the simulator (simpy time) drive the same
``ExpertCache``, which is what makes their hit/late/miss counts comparable.

Contract, following DESIGN.md:
- Slots are FREE, LOADING (a copy issued, not yet known complete) or READY;
  a slot is *pinned* while the (step, layer) being computed uses it.
- ``classify`` classifies each access of a (step, layer) as a hit (READY),
  late (LOADING) or miss (absent) and pins the whole layer's set before any
  eviction; ``admit_misses`` then gives misses slots (after stale prefetches
  were withdrawn, so their slots can serve), pinned until ``release_layer``.
  The order of these calls is ``protocol.py``'s business.
- Eviction only takes READY, unpinned slots, chosen by the pool's policy; a
  LOADING slot is never evicted or overwritten.
- Scope ``global`` is one pool; ``per-layer`` gives each layer an equal share.
- Hybrid execution: ``to_host`` turns a classified miss (or late prefetch) into a
  host-computed access (outcome HOST: a miss takes no slot and is forgotten by the
  policy); ``host_layer`` counts a host layer's accesses without touching slots;
  ``fill`` gives a host-computed expert a LOADING slot for a background copy,
  evicting only what a prefetch could. Bytes are counted when a copy is issued.
- Prefetches never evict a pinned expert or one the same plan wants, never
  exceed the budget, are capped at ``max_inflight`` in flight, and leave each
  pool room for one layer's demand (``experts_per_layer`` slots).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Iterable, Sequence

from moe_runtime.core.keys import Key
from moe_runtime.core.policies import EvictionPolicy, make_policy

FREE, LOADING, READY = 0, 1, 2


class Outcome(IntEnum):
    HIT = 0
    LATE = 1
    MISS = 2
    HOST = 3  # computed on the host from its host copy (a miss or a late prefetch the protocol sent there)


_HIT, _LATE, _MISS, _HOST = Outcome.HIT, Outcome.LATE, Outcome.MISS, Outcome.HOST


@dataclass
class CacheStats:
    """Counters of one run; ``prefetch_issued == prefetch_used + prefetch_wasted`` after ``finish``."""

    accesses: int = 0
    hits: int = 0
    late: int = 0
    misses: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    prefetch_cancelled: int = 0
    evictions: int = 0
    bytes_h2d: int = 0
    host_computed: int = 0  # accesses computed on the host (misses, late prefetches, host layers' experts)
    fills: int = 0  # background copies of host-computed experts into the cache
    layer_hits: list[int] = field(default_factory=list)
    layer_late: list[int] = field(default_factory=list)
    layer_misses: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


class ExpertCache:
    def __init__(
        self,
        *,
        n_slots: int,
        n_moe_layers: int,
        n_experts: int,
        experts_per_layer: int,
        expert_bytes: int,
        policy: str = "lru",
        scope: str = "global",
        max_inflight: int = 4,
        future: Sequence[Key] | None = None,
        popularity: dict[Key, float] | None = None,
    ) -> None:
        if scope not in ("global", "per-layer"):
            raise ValueError(f"cache scope must be 'global' or 'per-layer', not {scope!r}")
        self.n_moe_layers, self.n_experts = n_moe_layers, n_experts
        self.experts_per_layer, self.expert_bytes = experts_per_layer, expert_bytes
        self.max_inflight, self.scope = max_inflight, scope
        n_pools = 1 if scope == "global" else n_moe_layers
        self.pool_size = n_slots // n_pools
        self.n_slots = self.pool_size * n_pools
        self.pools: list[EvictionPolicy] = []
        for p in range(n_pools):
            pool_future = future if n_pools == 1 or future is None else [k for k in future if k[0] == p]
            pool_pop = popularity if n_pools == 1 or popularity is None else {
                k: v for k, v in popularity.items() if k[0] == p}
            self.pools.append(make_policy(
                policy, n_moe_layers=n_moe_layers, capacity=self.pool_size,
                stream_slots=experts_per_layer + max_inflight, future=pool_future, popularity=pool_pop))
        # Free slots per pool, popped from the end so slot 0 is used first.
        self._free = [list(range((p + 1) * self.pool_size - 1, p * self.pool_size - 1, -1)) for p in range(n_pools)]
        self.key_of: list[Key | None] = [None] * self.n_slots
        self.state = [FREE] * self.n_slots
        self.slot_of: dict[Key, int] = {}
        self._pinned: set[int] = set()
        self._unused_prefetch: dict[int, tuple[int, int]] = {}  # slot -> (step, target layer)
        self._prefetch_loading = [0] * n_pools
        # prefetch slots still loading, in issue order (a dict as an ordered set: see stale_prefetches)
        self._loading_prefetch: dict[int, None] = {}
        self._pending: list[Key] = []  # misses of the layer being classified, not yet given a slot
        self._loading_fill: dict[int, int] = {}  # slot -> pool of fills still loading
        self._fill_loading = [0] * n_pools
        self.step = 0
        self.stats = CacheStats(layer_hits=[0] * n_moe_layers, layer_late=[0] * n_moe_layers, layer_misses=[0] * n_moe_layers)

    # -- queries -----------------------------------------------------------------
    def _pool(self, layer: int) -> int:
        return 0 if self.scope == "global" else layer

    # -- the compute's side ----------------------------------------------------------
    def begin_step(self) -> None:
        """Mark the start of a new step (one forward pass); prefetch targets refer to it."""
        self.step += 1

    def classify(self, layer: int, ids: Iterable[int]) -> list[list]:
        """Classify the (step, layer)'s experts and pin every one of them, before any eviction.

        Returns ``[expert, slot, outcome]`` per access in order; a miss has slot -1 until
        ``admit_misses`` gives it one. Each key is shown to the policy in access order (a
        missed key is inserted there too, holding no slot yet), so recency, counts and
        Belady's cursor are those of a plain one-access-at-a-time cache.
        """
        policy = self.pools[0 if self.scope == "global" else layer]
        access, slot_of, state = policy.access, self.slot_of, self.state
        pin, unused = self._pinned.add, self._unused_prefetch
        out = []
        hits = late = misses = used = 0  # counted here, added to the stats once per layer (host time)
        for e in ids:
            key = (layer, e)
            access(key)
            slot = slot_of.get(key)
            if slot is None:
                policy.insert(key)
                self._pending.append(key)
                out.append([e, -1, _MISS])
                misses += 1
                continue
            if state[slot] == READY:
                out.append([e, slot, _HIT])
                hits += 1
            else:
                out.append([e, slot, _LATE])
                late += 1
            if unused and unused.pop(slot, None) is not None:
                used += 1
            pin(slot)
        st = self.stats
        st.accesses += hits + late + misses
        if hits:
            st.hits += hits
            st.layer_hits[layer] += hits
        if late:
            st.late += late
            st.layer_late[layer] += late
        if misses:
            st.misses += misses
            st.layer_misses[layer] += misses
        st.prefetch_used += used
        return out

    def stale_prefetches(self, layer: int) -> list[int]:
        """Prefetch slots still loading whose target layer has passed unused (or an earlier step's)."""
        if not self._unused_prefetch:
            return []
        step, unused = self.step, self._unused_prefetch
        # only a loading prefetch can be withdrawn: walk those (at most max_inflight), not every unused
        # one; both dicts are in issue order, so the order is that of the unused prefetches
        return [s for s in self._loading_prefetch
                if s in unused and (unused[s][0] < step or unused[s][1] <= layer)]

    def admit_misses(self, outcomes: list[list]) -> None:
        """Give each miss of ``classify``'s outcomes a LOADING slot (in place), evicting only unpinned,
        READY experts outside the layer's set; the slots are pinned."""
        if not self._pending:
            return
        layer = self._pending[0][0]
        pool = self._pool(layer)
        ok = self._evictable(())
        self.stats.bytes_h2d += len(self._pending) * self.expert_bytes
        for o in outcomes:
            if o[1] == -1 and o[2] is _MISS:
                key = (layer, o[0])
                o[1] = slot = self._take_slot(pool, layer, ok)
                if slot is None:
                    raise RuntimeError(f"internal: no evictable slot for demand of {key}")
                self._map(slot, key)
                self._pinned.add(slot)
        self._pending.clear()

    def to_host(self, layer: int, row: list) -> None:
        """``classify``'s ``row`` [expert, slot, outcome] is computed on the host: a miss takes no slot (the
        policy forgets the key it was shown), a late prefetch keeps loading (it lands as a resident expert)."""
        if row[2] is _MISS:
            key = (layer, row[0])
            self._pending.remove(key)
            self.pools[self._pool(layer)].remove(key)
        row[2] = _HOST
        self.stats.host_computed += 1

    def host_layer(self, layer: int, ids: Sequence[int]) -> None:
        """A host layer's accesses: counted as misses computed on the host; no slot, no pin. Each key is
        still shown to the policy (a no-op for keys it does not hold), so Belady's cursor stays in step."""
        access = self.pools[self._pool(layer)].access
        for e in ids:
            access((layer, e))
        n, st = len(ids), self.stats
        st.accesses += n
        st.misses += n
        st.layer_misses[layer] += n
        st.host_computed += n

    def fill(self, key: Key, layer: int) -> int | None:
        """A LOADING slot for a background copy of host-computed ``key`` (a fill), evicting only unpinned
        READY experts; None when none may go, or when fills and prefetches in flight already take
        ``max_inflight`` slots (or the pool's room beside one layer's demand). ``layer``: the compute's."""
        pool = self._pool(key[0])
        room = self.pool_size - self.experts_per_layer
        if key in self.slot_of or len(self._loading_prefetch) + len(self._loading_fill) >= self.max_inflight \
                or self._prefetch_loading[pool] + self._fill_loading[pool] >= room:
            return None
        slot = self._take_slot(pool, layer, self._evictable(()))
        if slot is None:
            return None
        self._map(slot, key)
        self.pools[pool].insert(key)
        self._loading_fill[slot] = pool
        self._fill_loading[pool] += 1
        self.stats.fills += 1
        self.stats.bytes_h2d += self.expert_bytes
        return slot

    def release_layer(self) -> None:
        """Unpin the experts of the layer just computed."""
        self._pinned.clear()

    # -- the copy engine's side ------------------------------------------------------
    def copy_done(self, slot: int) -> None:
        """The copy into ``slot`` has completed (observed by the caller's clock)."""
        if self.state[slot] == LOADING:
            self.state[slot] = READY
            if slot in self._loading_prefetch:
                del self._loading_prefetch[slot]
                self._prefetch_loading[self._pool(self.key_of[slot][0])] -= 1
            elif self._loading_fill:
                pool = self._loading_fill.pop(slot, None)
                if pool is not None:
                    self._fill_loading[pool] -= 1

    def cancel(self, slot: int) -> None:
        """A queued prefetch was withdrawn before its copy started: the slot is free again."""
        assert slot in self._loading_prefetch and slot not in self._pinned, "only queued, unused prefetches"
        key = self.key_of[slot]
        pool = self._pool(key[0])
        del self._loading_prefetch[slot]
        self._prefetch_loading[pool] -= 1
        self._unused_prefetch.pop(slot)
        self.stats.prefetch_cancelled += 1
        self.stats.prefetch_wasted += 1
        self.stats.bytes_h2d -= self.expert_bytes
        self._unmap(slot, pool)
        self._free[pool].append(slot)

    def prefetch(self, plan: Sequence[Key], layer: int) -> list[tuple[Key, int]]:
        """Allocate LOADING slots for planned keys not yet resident; returns (key, slot) to copy, in order.

        ``plan`` is in priority order; its keys are protected from eviction by
        each other. ``layer`` is the layer the compute is at.
        """
        protect = set(plan)
        ok = self._evictable(protect)  # one predicate for the whole plan (host time)
        slot_of, loading, unused = self.slot_of, self._loading_prefetch, self._unused_prefetch
        room, per_pool, step = self.pool_size - self.experts_per_layer, self._prefetch_loading, self.step
        fills, fill_pool = len(self._loading_fill), self._fill_loading  # fills hold slots too (0 under copy)
        issued = []
        for key in plan:
            if key in slot_of:
                continue
            if len(loading) + fills >= self.max_inflight:
                break
            pool = 0 if self.scope == "global" else key[0]
            if per_pool[pool] + fill_pool[pool] >= room:
                continue  # keep room for one layer's demand in this pool
            slot = self._take_slot(pool, layer, ok)
            if slot is None:
                continue
            self._map(slot, key)
            self.pools[pool].insert(key)
            loading[slot] = None
            per_pool[pool] += 1
            unused[slot] = (step, key[0])
            issued.append((key, slot))
        if issued:
            self.stats.prefetch_issued += len(issued)
            self.stats.bytes_h2d += len(issued) * self.expert_bytes
        return issued

    def finish(self) -> CacheStats:
        """End of run: prefetched experts never used count as wasted."""
        self.stats.prefetch_wasted += len(self._unused_prefetch)
        self._unused_prefetch.clear()
        return self.stats

    # -- internals -------------------------------------------------------------------
    def _evictable(self, protect) -> callable:
        slot_of, state, pinned = self.slot_of, self.state, self._pinned

        def ok(key: Key) -> bool:  # a missed key of the current layer is known to the policy, not mapped
            s = slot_of.get(key)
            return s is not None and state[s] == READY and s not in pinned and key not in protect
        return ok

    def _take_slot(self, pool: int, layer: int, ok) -> int | None:
        """A free slot of ``pool``, else one freed by evicting the policy's victim among the keys for which
        ``ok`` (an ``_evictable`` predicate) holds; None if none may go."""
        free = self._free[pool]
        if free:
            return free.pop()
        victim = self.pools[pool].victim(ok, layer)
        if victim is None:
            return None
        slot = self.slot_of[victim]
        if self._unused_prefetch.pop(slot, None) is not None:
            self.stats.prefetch_wasted += 1
        self.stats.evictions += 1
        self._unmap(slot, pool)
        return slot

    def _map(self, slot: int, key: Key) -> None:
        self.key_of[slot] = key
        self.slot_of[key] = slot
        self.state[slot] = LOADING

    def _unmap(self, slot: int, pool: int) -> None:
        key = self.key_of[slot]
        self.pools[pool].remove(key)
        del self.slot_of[key]
        self.key_of[slot] = None
        self.state[slot] = FREE


def access_sequence(steps: Iterable[Sequence[Sequence[int]]]) -> list[Key]:
    """The keys ``classify`` (and ``host_layer``) will see, in order: ``steps`` yields, per step, the ids of
    each layer."""
    return [(layer, int(e)) for step in steps for layer, ids in enumerate(step) for e in ids]
