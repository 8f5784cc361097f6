"""The host-RAM tier of a three-tier replay (storage -> host RAM -> device), as the copies see it.

With ``--expert-source disk`` the replay's slow link depends on the tiers:

- two tiers (no ``--host-budget``; a CPU-only machine, whose RAM cache is the
  compute tier): the device cache is fed by the profile's storage link
  directly, modelled by the same copy engines as a host-to-device link: one
  read after another at the disk's aggregate rate (``read_queue_depth`` reads
  in flight), the latency charged only to a read that starts the idle disk (a
  read queued behind another is pipelined with it: copies.py's ``idle_s``);
- three tiers (``--host-budget``): a device miss or prefetch is a
  host-to-device copy whose source must first be in host RAM. ``HostTier``
  says when it is: at once for an expert the tier holds, else after a read on
  the storage link (one reader at the aggregate rate); the expert then enters
  the tier and its least recently used expert leaves. A prefetch stages its
  expert into RAM when it is issued, so a queued prefetch's read runs while
  it waits for the copy engine; a withdrawn copy leaves its read done.

Counts: ``hits`` and ``misses`` of the tier (one per device copy asked for),
``bytes_read`` from storage. Nothing here knows simpy or the protocol.
"""

from __future__ import annotations

from moe_runtime.core.host_tier import HostTierIndex
from moe_runtime.core.keys import Key


class HostTier:
    def __init__(self, *, capacity: int, readers: int, read_s: float, expert_bytes: int) -> None:
        self.index = HostTierIndex(capacity)  # which experts RAM holds: the executor's bookkeeping
        self.read_s, self.expert_bytes = read_s, expert_bytes
        self.ready_at = [0.0] * capacity  # when each host slot's expert is (or was) in RAM
        self.free_at = [0.0] * readers  # when each reader finishes its last read
        self.bytes_read = 0

    def ready(self, key: Key, t: float) -> float:
        """When ``key`` is in host RAM for a copy asked for at ``t`` (reading it now if the tier lacks it)."""
        slot = self.index.lookup(key)
        if slot is not None:
            at = self.ready_at[slot]
            return at if at > t else t
        slot = self.index.admit(key)  # nothing is pinned here: a copy's source is read when it is asked for
        self.bytes_read += self.expert_bytes
        f = self.free_at
        e = 0 if len(f) == 1 else min(range(len(f)), key=f.__getitem__)
        start = f[e] if f[e] > t else t
        f[e] = self.ready_at[slot] = start + self.read_s
        return self.ready_at[slot]

    def report(self) -> dict:
        ix = self.index
        return {"host_slots": ix.capacity, "host_hits": ix.hits, "host_misses": ix.misses,
                "bytes_read": self.bytes_read}
