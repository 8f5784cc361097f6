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
from collections import OrderedDict, defaultdict
from typing import Callable, ClassVar, Iterable, Sequence

from .errors import MoeError

Key = tuple[int, int]  # (MoE layer, expert id)
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
        if key in self._lru:
            self._lru.move_to_end(key)

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


class LFU(EvictionPolicy):
    """Evict the fewest-used expert; counts survive eviction (frequency so far); ties by LRU."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self._count: dict[Key, int] = defaultdict(int)

    def access(self, key: Key) -> None:
        self._count[key] += 1
        super().access(key)

    def victim(self, evictable: Evictable, layer: int) -> Key | None:
        best, best_count = None, None
        for k in self._lru:  # LRU order, so the first minimum wins ties
            if evictable(k) and (best_count is None or self._count[k] < best_count):
                best, best_count = k, self._count[k]
        return best


class LayerCyclic(EvictionPolicy):
    """Evict from the layer furthest ahead of the current one in cyclic order.

    At layer c the layer c-1 (just computed) is L-1 steps ahead, so it goes
    first; c+1 (needed next) goes last. Within a layer, LRU.
    """

    name = "layer-cyclic"

    def __init__(self, n_layers: int) -> None:
        super().__init__()
        self.n_layers = n_layers
        self._by_layer: list[OrderedDict[Key, None]] = [OrderedDict() for _ in range(n_layers)]

    def insert(self, key: Key) -> None:
        self._by_layer[key[0]][key] = None

    def access(self, key: Key) -> None:
        od = self._by_layer[key[0]]
        if key in od:
            od.move_to_end(key)

    def remove(self, key: Key) -> None:
        self._by_layer[key[0]].pop(key, None)

    def victim(self, evictable: Evictable, layer: int) -> Key | None:
        for ahead in range(self.n_layers - 1, -1, -1):
            od = self._by_layer[(layer + ahead) % self.n_layers]
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
    with; the policy counts its calls to know where it stands.
    """

    name = "belady"
    needs_future = True

    def __init__(self, future: Sequence[Key]) -> None:
        super().__init__()
        self._uses: dict[Key, list[int]] = defaultdict(list)
        for i, k in enumerate(future):
            self._uses[k].append(i)
        self._now = 0

    def access(self, key: Key) -> None:
        self._now += 1
        super().access(key)

    def _next_use(self, key: Key) -> float:
        uses = self._uses.get(key)
        if not uses:
            return float("inf")
        i = bisect.bisect_left(uses, self._now)
        return uses[i] if i < len(uses) else float("inf")

    def victim(self, evictable: Evictable, layer: int) -> Key | None:
        best, best_next = None, -1.0
        for k in self._lru:  # LRU order breaks ties among never-again keys
            if evictable(k):
                nxt = self._next_use(k)
                if nxt > best_next:
                    best, best_next = k, nxt
                    if nxt == float("inf"):
                        break
        return best


EVICTION_POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls for cls in (LRU, LFU, FIFO, LayerCyclic, Static, Belady)
}


def make_policy(
    name: str,
    *,
    n_layers: int,
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
        return LayerCyclic(n_layers)
    if cls is Static:
        if popularity is None:
            raise MoeError("eviction policy 'static' needs a popularity profile (a routing trace)")
        return Static(popularity, capacity, stream_slots)
    if cls is Belady:
        if future is None:
            raise MoeError("eviction policy 'belady' needs the future accesses: route from a trace")
        return Belady(list(future))
    return cls()
