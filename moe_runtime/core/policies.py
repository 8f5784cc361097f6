"""Eviction policies: which resident expert leaves the cache to make room.

One registry (``EVICTION_POLICIES``) shared by the executor and the simulator.
A policy sees, for the pool it serves, every insertion (a slot given to an
expert), every access (a use by the compute, in the order of DESIGN.md:
step-major, then layer, then rank) and every removal, and names a victim on
request. It knows nothing of slots, bytes, copies or clocks; the cache
(``expert_cache.py``) decides what is evictable (ready and not pinned) and
passes that as a predicate.
"""

from __future__ import annotations

import bisect
import heapq
from collections import OrderedDict, defaultdict
from typing import Callable, ClassVar, Iterable, Sequence

import numpy as np

from moe_runtime.core.errors import MoeError
from moe_runtime.core.keys import Key

Evictable = Callable[[Key], bool]


class EvictionPolicy:
    """Base: least-recently-used order is kept for everyone, as the tie-breaker."""

    name: ClassVar[str] = ""
    needs_future: ClassVar[bool] = False
    needs_popularity: ClassVar[bool] = False

    def __init__(self) -> None:
        self._lru: OrderedDict[Key, None] = OrderedDict()  # oldest first

    def insert(self, key: Key) -> None:
        self._lru[key] = None

    def access(self, key: Key) -> None:
        try:
            self._lru.move_to_end(key)
        except KeyError:  # not resident (a miss is inserted after its access)
            pass

    def remove(self, key: Key) -> None:
        self._lru.pop(key, None)

    def victim(self, evictable: Evictable, layer: int) -> Key | None:
        """The key to evict among resident keys for which ``evictable`` holds, or None.

        ``layer`` is the MoE layer the compute is at (for layer-aware policies).
        """
        return next((k for k in self._lru if evictable(k)), None)


class LRU(EvictionPolicy):
    name = "lru"


class FIFO(EvictionPolicy):
    """Evict in order of insertion; accesses do not refresh."""

    name = "fifo"

    def access(self, key: Key) -> None:
        pass


class _LazyHeap:
    """A min-heap of (priority, key) where a key's live priority is kept in ``live``.

    Entries whose priority no longer matches ``live`` are stale and dropped when
    they surface, so updates are a push (O(log n)) instead of a re-sort.
    """

    def __init__(self) -> None:
        self.live: dict[Key, tuple] = {}
        self._heap: list[tuple[tuple, Key]] = []

    def set(self, key: Key, priority: tuple) -> None:
        self.live[key] = priority
        heapq.heappush(self._heap, (priority, key))

    def discard(self, key: Key) -> None:
        self.live.pop(key, None)

    def first(self, evictable: Evictable) -> Key | None:
        """The live key of least priority for which ``evictable`` holds (the heap is left intact)."""
        held, found = [], None
        while self._heap:
            prio, key = self._heap[0]
            if self.live.get(key) != prio:
                heapq.heappop(self._heap)  # stale
            elif evictable(key):
                found = key
                break
            else:
                held.append(heapq.heappop(self._heap))  # pinned, loading or protected: few
        for item in held:
            heapq.heappush(self._heap, item)
        return found


class LFU(EvictionPolicy):
    """Evict the fewest-used expert; counts survive eviction (frequency so far); ties by LRU."""

    name = "lfu"

    def __init__(self) -> None:
        self._count: dict[Key, int] = defaultdict(int)
        self._tick = 0
        self._heap = _LazyHeap()  # priority (uses, last use)

    def insert(self, key: Key) -> None:
        self._heap.set(key, (self._count[key], self._tick))

    def access(self, key: Key) -> None:
        self._tick += 1
        self._count[key] += 1
        if key in self._heap.live:
            self._heap.set(key, (self._count[key], self._tick))

    def remove(self, key: Key) -> None:
        self._heap.discard(key)

    def victim(self, evictable: Evictable, layer: int) -> Key | None:
        return self._heap.first(evictable)


class LayerCyclic(EvictionPolicy):
    """Evict from the layer furthest ahead of the current one in cyclic order.

    At layer c the layer c-1 (just computed) is L-1 steps ahead, so it goes
    first; c+1 (needed next) goes last. Within a layer, LRU.
    """

    name = "layer-cyclic"

    def __init__(self, n_moe_layers: int) -> None:
        super().__init__()
        self.n_moe_layers = n_moe_layers
        self._by_layer: list[OrderedDict[Key, None]] = [OrderedDict() for _ in range(n_moe_layers)]

    def insert(self, key: Key) -> None:
        self._by_layer[key[0]][key] = None

    def access(self, key: Key) -> None:
        od = self._by_layer[key[0]]
        if key in od:
            od.move_to_end(key)

    def remove(self, key: Key) -> None:
        self._by_layer[key[0]].pop(key, None)

    def victim(self, evictable: Evictable, layer: int) -> Key | None:
        for ahead in range(self.n_moe_layers - 1, -1, -1):
            od = self._by_layer[(layer + ahead) % self.n_moe_layers]
            k = next((k for k in od if evictable(k)), None)
            if k is not None:
                return k
        return None


class Static(EvictionPolicy):
    """A fixed hot set (the most popular experts that fit) stays; the rest stream through.

    The hot set is the ``capacity - stream_slots`` most popular keys of the
    popularity profile. Non-hot experts are evicted first (LRU among them);
    a hot expert is evicted only when nothing else can be.
    """

    name = "static"
    needs_popularity = True

    def __init__(self, popularity: dict[Key, float], capacity: int, stream_slots: int) -> None:
        super().__init__()
        n_hot = max(0, capacity - stream_slots)
        ranked = sorted(popularity, key=lambda k: (-popularity[k], k))
        self.hot = frozenset(ranked[:n_hot])

    def victim(self, evictable: Evictable, layer: int) -> Key | None:
        cold = next((k for k in self._lru if k not in self.hot and evictable(k)), None)
        return cold if cold is not None else super().victim(evictable, layer)


class Belady(EvictionPolicy):
    """Evict the expert whose next use lies furthest in the future (optimal miss count).

    ``future`` is the exact sequence of keys that ``access`` will be called
    with; the policy counts its calls to know where it stands. Among experts
    never used again any victim gives the same miss count.
    """

    name = "belady"
    needs_future = True
    NEVER = 1 << 62

    def __init__(self, future: Sequence[Key]) -> None:
        self._uses: dict[Key, list[int]] = defaultdict(list)
        for i, k in enumerate(future):
            self._uses[k].append(i)
        self._now = 0
        self._heap = _LazyHeap()  # priority (-next use,): furthest first

    def _next_use(self, key: Key) -> int:
        uses = self._uses.get(key, ())
        i = bisect.bisect_left(uses, self._now)
        return uses[i] if i < len(uses) else self.NEVER

    def insert(self, key: Key) -> None:
        self._heap.set(key, (-self._next_use(key),))

    def access(self, key: Key) -> None:
        self._now += 1
        if key in self._heap.live:
            self._heap.set(key, (-self._next_use(key),))

    def remove(self, key: Key) -> None:
        self._heap.discard(key)

    def victim(self, evictable: Evictable, layer: int) -> Key | None:
        return self._heap.first(evictable)


def popularity_counts(expert_ids) -> dict[Key, float]:
    """Uses per (layer, expert) in routed ids [T, L, K] (``static``'s profile); unused experts omitted."""
    ids = np.asarray(expert_ids, dtype=np.int64)
    out: dict[Key, float] = {}
    for layer in range(ids.shape[1]):
        counts = np.bincount(ids[:, layer].ravel())
        for e in np.flatnonzero(counts):
            out[(layer, int(e))] = float(counts[e])
    return out


EVICTION_POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls for cls in (LRU, LFU, FIFO, LayerCyclic, Static, Belady)
}


def make_policy(
    name: str,
    *,
    n_moe_layers: int,
    capacity: int,
    stream_slots: int,
    future: Iterable[Key] | None = None,
    popularity: dict[Key, float] | None = None,
) -> EvictionPolicy:
    """Build a registered policy for one pool; ``future``/``popularity`` only for those that need them."""
    cls = EVICTION_POLICIES.get(name)
    if cls is None:
        raise MoeError(f"unknown eviction policy {name!r}; choose one of {', '.join(EVICTION_POLICIES)}")
    if cls is LayerCyclic:
        return LayerCyclic(n_moe_layers)
    if cls is Static:
        if popularity is None:
            raise MoeError("eviction policy 'static' needs a popularity profile (a routing trace)")
        return Static(popularity, capacity, stream_slots)
    if cls is Belady:
        if future is None:
            raise MoeError("eviction policy 'belady' needs the future accesses: route from a trace")
        return Belady(list(future))
    return cls()
