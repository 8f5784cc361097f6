"""The copy engine of three tiers: storage -> a host-RAM tier -> device slots (``--host-budget``).

``TieredEngine(copier, reader, host_pool, index, segments)`` has the copy-engine interface the provider
and the per-layer protocol drive (submit, cancel_if_queued, promote, poll, wait, slot_released, close),
so every tier runs under the one protocol. ``submit(slot, key, dst, demand)`` asks for expert ``key`` in
device slot ``slot``:

- the host tier holds it (``HostTierIndex``): the device copy starts from its host slot at once;
- it does not: a host slot is taken (the least recently used unpinned one's expert leaves), ``reader``
  (a ``DiskReadEngine``) reads the expert into it, and the device copy is submitted when the read is
  done (seen by ``poll``, or by ``wait`` when the compute needs it). A prefetch therefore stages its
  expert into RAM as soon as it is issued, ahead of its device copy; a demand read goes ahead of queued
  reads, as on every link. Two device slots asking for one expert share its read.

A host slot is pinned while a read into it or a device copy out of it may still run: a copy the compute
waited for is unpinned only once the copier reports it done (``is_done``: on CUDA the compute stream
waited on the copy's event, the host did not). ``cancel_if_queued`` withdraws a copy not yet started and
a read not yet started (the expert then leaves the tier again). ``bytes_read`` and ``mode`` are the
reader's; ``index`` counts the tier's hits and misses.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from moe_runtime.core.host_tier import HostTierIndex, host_tier_minimum  # noqa: F401  (re-exported)
from moe_runtime.core.keys import Key
from moe_runtime.core.errors import MoeError


class TieredEngine:
    def __init__(self, copier, reader, host_pool: Tensor, index: HostTierIndex,
                 segments: Callable[[int, int], object]) -> None:
        self.copier, self.reader, self.index, self.segments = copier, reader, index, segments
        self.host_views = [host_pool[i] for i in range(index.capacity)]
        self.lanes = tuple(copier.lanes) + tuple(reader.lanes)
        self.needs_release = copier.needs_release
        self.base = copier.base
        self._job: dict[int, list] = {}  # device slot -> [key, host slot, dst, demand, copy submitted]
        self._reading: dict[int, list[int]] = {}  # host slot being read -> device slots waiting for it
        self._waited: list[tuple[int, int]] = []  # (device slot, host slot) waited for, not yet seen done

    @property
    def records(self) -> list:
        return self.copier.records + self.reader.records

    @property
    def bytes_read(self) -> int:
        return self.reader.bytes_read

    @property
    def mode(self) -> str:
        return self.reader.mode

    def submit(self, slot: int, key: Key, dst: Tensor, demand: bool) -> None:
        hs = self.index.lookup(key)
        if hs is None:
            hs = self.index.admit(key)
            if hs is None:  # the minimum host budget (checked at build) leaves a slot for every copy in flight
                raise MoeError("internal: every host-tier slot is in use")
            self.reader.submit(hs, self.segments(*key), self.host_views[hs], demand)
            self._reading[hs] = [slot]
        elif hs in self._reading:  # already being read for another device slot: this copy follows it
            self._reading[hs].append(slot)
            if demand:
                self.reader.promote(hs)
        self.index.pin(hs)
        self._job[slot] = job = [key, hs, dst, demand, False]
        if hs not in self._reading:
            self._copy(slot, job)

    def _copy(self, slot: int, job: list) -> None:
        job[4] = True
        self.copier.submit(slot, self.host_views[job[1]], job[2], job[3])

    def _read_done(self, hs: int) -> None:
        for slot in self._reading.pop(hs, ()):
            self._copy(slot, self._job[slot])

    def poll(self) -> list[int]:
        for hs in self.reader.poll():  # reads finished: their device copies may start
            self._read_done(hs)
        if self._waited:
            still = []
            for slot, hs in self._waited:
                if self.copier.is_done(slot):
                    self.index.unpin(hs)
                else:
                    still.append((slot, hs))
            self._waited = still
        done = []
        for slot in self.copier.poll():
            job = self._job.get(slot)
            if job is not None and job[4]:  # else a report of the slot's previous copy, already waited for
                del self._job[slot]
                self.index.unpin(job[1])
                done.append(slot)
        return done

    def wait(self, slot: int) -> None:
        hs = self._job[slot][1]
        if hs in self._reading:
            # CPU waits on the storage here: the expert is still being read into the host tier
            self.reader.wait(hs)
            self._read_done(hs)
        self.copier.wait(slot)
        self._job.pop(slot)
        self._waited.append((slot, hs))  # unpinned once the copier says the copy is done (poll)

    def cancel_if_queued(self, slot: int) -> bool:
        job = self._job.get(slot)
        if job is None:
            return False
        key, hs = job[0], job[1]
        waiters = self._reading.get(hs)
        if waiters is not None:
            if waiters != [slot] or not self.reader.cancel_if_queued(hs):
                return False  # being read, or shared: it completes
            del self._reading[hs]
            self.index.drop(key)  # never read: the tier does not hold it
        elif self.copier.cancel_if_queued(slot):
            self.index.unpin(hs)
        else:
            return False
        del self._job[slot]
        return True

    def promote(self, slot: int) -> None:
        job = self._job.get(slot)
        if job is None:
            return
        job[3] = True
        if job[1] in self._reading:
            self.reader.promote(job[1])
        else:
            self.copier.promote(slot)

    def is_done(self, slot: int) -> bool:
        return slot not in self._job and self.copier.is_done(slot)

    def slot_released(self, slot: int) -> None:
        self.copier.slot_released(slot)

    def close(self) -> None:
        """Drain the reads, let their copies run, then stop both engines."""
        try:
            self.reader.close()
            for hs in list(self._reading):
                self._read_done(hs)
        finally:
            self.copier.close()


def three_tier_engine(make_reader: Callable[[int], object], segments: Callable[[int, int], object],
                      host_slots: int, layout, *, pin: bool) -> Callable:
    """``make_engine(n_slots, device)`` for ``OffloadedExperts``: device copies by the device's copy engine
    from a host tier of ``host_slots`` experts (aligned for direct reads; pinned for CUDA copies), fed by
    ``make_reader(host_slots)``; the provider's ``source`` must give each expert's (layer, expert) key."""
    from moe_runtime.offload.cuda_engine import make_copy_engine
    from moe_runtime.offload.storage import aligned_pool

    def make(n_slots: int, device) -> TieredEngine:
        pool = aligned_pool(host_slots, layout.numel, layout.dtype)
        if pin:
            pool = pool.pin_memory()  # page-locked (and page-aligned) for asynchronous host-to-device copies
        return TieredEngine(make_copy_engine(n_slots, device), make_reader(host_slots), pool,
                            HostTierIndex(host_slots), segments)
    return make
