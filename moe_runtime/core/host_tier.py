"""The host-RAM tier of a three-tier run (storage -> host RAM -> device): which experts it holds, and where.

One definition for both halves: the executor's ``TieredEngine`` (offload/tiered.py) keeps its host
slots with it, and the simulator's ``HostTier`` (simulator/tiers.py) its timing.

Contract: ``HostTierIndex(capacity)`` maps (layer, expert) keys to ``capacity`` host slots, least recently
used first. ``lookup(key)`` -> its slot (counted a hit, made most recent) or None; ``admit(key)`` -> a slot
for a key the tier lacks (counted a miss): a free one, else the least recently used unpinned one's,
whose key leaves; None when every slot is pinned. A slot is pinned while a read into it or a copy out of
it is in flight (``pin``/``unpin`` nest); ``drop(key)`` forgets a key whose read was withdrawn (and
its miss: ``misses`` counts the reads that ran).
"""

from __future__ import annotations

from collections import OrderedDict

from moe_runtime.core.keys import Key


class HostTierIndex:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a host tier needs at least one slot")
        self.capacity = capacity
        self.slot_of: OrderedDict[Key, int] = OrderedDict()  # least recently used first
        self.key_of: list[Key | None] = [None] * capacity
        self._free = list(range(capacity - 1, -1, -1))
        self._pins = [0] * capacity
        self.hits = self.misses = 0

    def lookup(self, key: Key) -> int | None:
        slot = self.slot_of.get(key)
        if slot is not None:
            self.slot_of.move_to_end(key)
            self.hits += 1
        return slot

    def admit(self, key: Key) -> int | None:
        self.misses += 1
        if self._free:
            slot = self._free.pop()
        else:
            victim = next((k for k, s in self.slot_of.items() if not self._pins[s]), None)
            if victim is None:
                return None
            slot = self.slot_of.pop(victim)
        self.slot_of[key] = slot
        self.key_of[slot] = key
        return slot

    def pin(self, slot: int) -> None:
        self._pins[slot] += 1

    def unpin(self, slot: int) -> None:
        self._pins[slot] -= 1

    def drop(self, key: Key) -> None:
        self.misses -= 1  # its read was withdrawn before it started: the miss never cost anything
        slot = self.slot_of.pop(key)
        self.key_of[slot] = None
        self._pins[slot] = 0
        self._free.append(slot)


def host_tier_minimum(layer_demand: int, max_inflight: int) -> int:
    """Host slots a three-tier run needs: every device copy in flight pins one (a layer's misses and the
    prefetches), and a copy waited for stays pinned until its completion is seen, up to a layer later."""
    return 2 * (layer_demand + max_inflight)
