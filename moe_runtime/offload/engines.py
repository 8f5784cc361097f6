"""The copy engine: moves one expert's flat host buffer into one device slot, and says when it is there.

Contract (the same on both implementations):

- ``submit(slot, src, dst, demand)`` starts (or queues) one copy of ``src``
  (a flat host buffer) into ``dst`` (the slot's flat device tensor). At most
  one copy per slot is outstanding; the caller guarantees it (the cache never
  hands out a LOADING slot). Demand copies go ahead of every queued prefetch.
- ``cancel_if_queued(slot) -> bool`` withdraws a prefetch that has not started;
  False means it has started (or finished) and will complete.
- ``promote(slot)`` moves a queued prefetch ahead as a demand copy (the
  compute needs it now); a started or finished copy is left as it is.
- ``poll() -> [slot]`` returns the slots whose copies completed since the last
  poll, without waiting. ``wait(slot)`` makes the compute wait for that slot's
  copy only (CUDA: the compute stream waits on the copy's event; CPU: the
  compute thread blocks on the copy's ``threading.Event``) and returns; the
  slot is then ready for the compute.
- ``slot_released(slot)`` tells the engine the compute has issued its last read
  of a slot (CUDA: an event is recorded on the compute stream; the next copy
  into that slot waits for it, so a copy never overwrites weights still being
  read). On CPU the compute is synchronous and this is a no-op.
- ``records`` holds one ``CopyRecord`` per finished copy (start/end seconds on
  the engine's clock, bytes, lane) for the timeline and the achieved bandwidth.

This module keeps no bookkeeping of which expert is where: it knows slots,
tensors and events only (the cache is ``expert_cache.py``). Nothing is
allocated per copy: events and flags are preallocated per slot.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class CopyRecord:
    slot: int
    demand: bool
    start_s: float
    end_s: float
    nbytes: int
    lane: str


def achieved_gbps(records: list[CopyRecord]) -> float:
    """Bytes moved over the time copies were running (per copy, summed), in GB/s (decimal); 0 with no copies."""
    busy = sum(r.end_s - r.start_s for r in records)
    return sum(r.nbytes for r in records) / busy / 1e9 if busy > 0 else 0.0


class ThreadCopyEngine:
    """CPU stand-in for the copy streams: one worker thread, a priority queue (demand first, then FIFO).

    The worker runs ``dst.copy_(src)`` (torch releases the GIL, so copies overlap
    the compute thread). Only the compute thread calls the public methods.
    """

    lanes = ("copy",)
    needs_release = False  # the compute is synchronous: a released slot is no longer read

    def __init__(self, n_slots: int) -> None:
        self._done = [threading.Event() for _ in range(n_slots)]  # set when the slot's copy finished
        self._queued: dict[int, list] = {}  # slot -> heap entry, while not started
        self._heap: list[list] = []  # [priority, seq, slot, src, dst, demand, cancelled, gen]
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._outstanding: set[int] = set()  # submitted and not yet reported by poll/wait
        self._gen = [0] * n_slots  # copies submitted per slot, so a late report of an older copy is ignored
        self._finished: deque[tuple[int, int]] = deque()  # (slot, gen) finished by the worker, not yet polled
        self.records: list[CopyRecord] = []
        self._stop = False
        self._error: BaseException | None = None  # a failed copy; re-raised on the compute thread
        self.clock = time.perf_counter
        self.base = self.clock()  # time zero of the records
        self._worker = threading.Thread(target=self._run, name="moe-copy", daemon=True)
        self._worker.start()

    def submit(self, slot: int, src: Tensor, dst: Tensor, demand: bool) -> None:
        self._done[slot].clear()
        self._gen[slot] += 1
        entry = [0 if demand else 1, next(self._seq), slot, src, dst, demand, False, self._gen[slot]]
        with self._cv:
            self._outstanding.add(slot)
            self._queued[slot] = entry
            heapq.heappush(self._heap, entry)
            self._cv.notify()

    def cancel_if_queued(self, slot: int) -> bool:
        with self._lock:
            entry = self._queued.pop(slot, None)
            if entry is None:
                return False
            entry[6] = True  # the worker skips it; the heap entry is dropped when popped
            self._outstanding.discard(slot)
            return True

    def poll(self) -> list[int]:
        if not self._finished:  # nothing finished since the last poll: no lock taken (host time per layer)
            return []
        out = []
        with self._lock:
            while self._finished:
                s, gen = self._finished.popleft()
                if gen == self._gen[s] and s in self._outstanding:
                    self._outstanding.discard(s)
                    out.append(s)
        return out

    def promote(self, slot: int) -> None:
        with self._cv:
            entry = self._queued.get(slot)
            if entry is not None and entry[0] != 0:  # a queued prefetch the compute now needs: make it demand
                entry[6] = True
                promoted = [0, next(self._seq), *entry[2:6], False, entry[7]]
                self._queued[slot] = promoted
                heapq.heappush(self._heap, promoted)
                self._cv.notify()

    def wait(self, slot: int) -> None:
        # CPU waits on the copy thread here: block until this slot's copy has finished
        self._done[slot].wait()
        if self._error is not None:
            raise RuntimeError(f"the copy thread failed: {self._error}") from self._error
        with self._lock:
            self._outstanding.discard(slot)

    def is_done(self, slot: int) -> bool:
        return self._done[slot].is_set()

    def is_queued(self, slot: int) -> bool:
        """Submitted and not yet started."""
        with self._lock:
            return slot in self._queued

    def slot_released(self, slot: int) -> None:
        pass  # the compute is synchronous on CPU: a released slot is no longer read

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._worker.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._heap:
                    self._cv.wait()
                if not self._heap:  # stopped, and every queued copy done: close() drains, so counts are whole
                    return
                entry = heapq.heappop(self._heap)
                if entry[6]:
                    continue
                _, _, slot, src, dst, demand, _, gen = entry
                del self._queued[slot]
            t0 = self.clock() - self.base
            try:
                dst.copy_(src)
            except BaseException as e:  # wake every waiter: a silent death would hang the compute
                self._error = e
                for done in self._done:
                    done.set()
                return
            t1 = self.clock() - self.base
            self.records.append(CopyRecord(slot, demand, t0, t1, src.numel() * src.element_size(), "copy"))
            self._done[slot].set()  # before the report, so a polled slot's flag is already set
            with self._lock:
                self._finished.append((slot, gen))


class CudaCopyEngine:
    """Copies on dedicated CUDA streams: a high-priority demand stream and a prefetch stream.

    Prefetches wait in a software queue and at most ``stream_depth`` of them are
    on the prefetch stream at a time, so a prefetch found stale can still be
    cancelled. Each copy records a start and an end event (preallocated per
    slot); the compute stream waits on the end event of a slot it needs, never
    on a whole stream or the device. Times are seconds since the engine's base
    event, measured with ``Event.elapsed_time`` once a copy is seen complete.
    """

    lanes = ("copy:demand", "copy:prefetch")
    needs_release = True  # the compute stream may still read a slot after the host moved on

    def __init__(self, n_slots: int, device: torch.device, stream_depth: int = 2) -> None:
        lo, hi = torch.cuda.Stream.priority_range()  # (lowest, highest); higher priority is more negative
        self.device = device
        self.demand_stream = torch.cuda.Stream(device=device, priority=hi)
        self.prefetch_stream = torch.cuda.Stream(device=device, priority=lo)
        self.stream_depth = stream_depth
        timing = dict(enable_timing=True)
        self._start = [torch.cuda.Event(**timing) for _ in range(n_slots)]
        self._end = [torch.cuda.Event(**timing) for _ in range(n_slots)]
        self._released = [torch.cuda.Event() for _ in range(n_slots)]
        self._ever_used = [False] * n_slots
        self._queue: deque[tuple[int, Tensor, Tensor]] = deque()  # prefetches not yet on the stream
        self._on_stream: dict[int, tuple[bool, int]] = {}  # slot -> (demand, nbytes) submitted, not polled
        self._prefetch_on_stream = 0
        self._reaped: list[int] = []  # completed, not yet reported by poll
        self.records: list[CopyRecord] = []
        self.base = torch.cuda.Event(enable_timing=True)  # time zero of the records
        self.base.record(torch.cuda.current_stream(device))

    def submit(self, slot: int, src: Tensor, dst: Tensor, demand: bool) -> None:
        if demand:
            self._launch(self.demand_stream, slot, src, dst, True)
        else:
            self._queue.append((slot, src, dst))
            self._pump()

    def cancel_if_queued(self, slot: int) -> bool:
        for i, item in enumerate(self._queue):
            if item[0] == slot:
                del self._queue[i]
                return True
        return False

    def poll(self) -> list[int]:
        self._reap()
        self._pump()
        out, self._reaped = self._reaped, []
        return out

    def _reap(self) -> None:
        """Complete the copies whose end event has passed (``query()`` does not block); poll reports them."""
        done = [s for s in self._on_stream if self._end[s].query()]
        for s in done:
            self._complete(s)
        self._reaped.extend(done)

    def promote(self, slot: int) -> None:
        for i, (s, src, dst) in enumerate(self._queue):  # a prefetch still in the software queue that the
            if s == slot:  # compute needs now goes on the demand stream
                del self._queue[i]
                self._launch(self.demand_stream, s, src, dst, True)
                return

    def wait(self, slot: int) -> None:
        # the compute stream (not the CPU) waits here, for this slot's copy event only
        torch.cuda.current_stream(self.device).wait_event(self._end[slot])
        self._reap()  # keep the prefetch stream fed
        self._pump()

    def is_done(self, slot: int) -> bool:
        return slot not in self._on_stream and not any(s == slot for s, _, _ in self._queue)

    def slot_released(self, slot: int) -> None:
        self._released[slot].record(torch.cuda.current_stream(self.device))
        self._ever_used[slot] = True

    def close(self) -> None:
        # CPU waits on the GPU here: the copy streams drain before the engine goes away
        self.demand_stream.synchronize()
        self.prefetch_stream.synchronize()
        for s in list(self._on_stream):
            self._complete(s)

    def _launch(self, stream, slot: int, src: Tensor, dst: Tensor, demand: bool) -> None:
        if slot in self._reaped:  # that report was of the slot's previous copy: never report it for this one
            self._reaped.remove(slot)
        if slot in self._on_stream:
            # CPU waits on the GPU here (rare): the slot's previous copy was used and released before a
            # poll saw it complete; its events are about to be re-recorded, so read its times first
            self._end[slot].synchronize()
            self._complete(slot)
        if self._ever_used[slot]:
            stream.wait_event(self._released[slot])  # do not overwrite weights the compute may still read
        with torch.cuda.stream(stream):
            self._start[slot].record(stream)
            dst.copy_(src, non_blocking=True)  # one pinned host -> device copy
            self._end[slot].record(stream)
        self._on_stream[slot] = (demand, src.numel() * src.element_size())
        if not demand:
            self._prefetch_on_stream += 1

    def _pump(self) -> None:
        while self._queue and self._prefetch_on_stream < self.stream_depth:
            slot, src, dst = self._queue.popleft()
            self._launch(self.prefetch_stream, slot, src, dst, False)

    def _complete(self, slot: int) -> None:
        demand, nbytes = self._on_stream.pop(slot)
        if not demand:
            self._prefetch_on_stream -= 1
        t0 = self.base.elapsed_time(self._start[slot]) / 1e3
        t1 = self.base.elapsed_time(self._end[slot]) / 1e3
        self.records.append(CopyRecord(slot, demand, t0, t1, nbytes, "copy:demand" if demand else "copy:prefetch"))


class LockstepEngine:
    """A deterministic engine for differential tests: copies complete by rule, not by time.

    A demand (or promoted) copy completes when the compute waits for it; prefetches complete
    in issue order at the next ``poll`` (the start of the next MoE layer), all of them or the
    first ``per_poll``, so a queued prefetch stays withdrawable (and can be late) until then.
    The simulator's ``lockstep`` copy model follows the same rule, which makes their decisions
    comparable one for one.
    """

    lanes = ("copy",)
    needs_release = False

    def __init__(self, n_slots: int, per_poll: int | None = None) -> None:
        self.per_poll = per_poll
        self._queue: dict[int, tuple[Tensor, Tensor, bool]] = {}  # slot -> (src, dst, demand), issue order
        self.records: list[CopyRecord] = []
        self.base = 0.0

    def submit(self, slot: int, src: Tensor, dst: Tensor, demand: bool) -> None:
        self._queue[slot] = (src, dst, demand)

    def cancel_if_queued(self, slot: int) -> bool:
        return self._queue.pop(slot, None) is not None

    def promote(self, slot: int) -> None:
        pass  # a queued copy completes at the wait anyway

    def _copy(self, slot: int) -> None:
        src, dst, demand = self._queue.pop(slot)
        dst.copy_(src)
        self.records.append(CopyRecord(slot, demand, 0.0, 0.0, src.numel() * src.element_size(), "copy"))

    def poll(self) -> list[int]:
        done = [s for s, (_, _, demand) in self._queue.items() if not demand][: self.per_poll]
        for s in done:
            self._copy(s)
        return done

    def wait(self, slot: int) -> None:
        if slot in self._queue:
            self._copy(slot)

    def slot_released(self, slot: int) -> None:
        pass

    def close(self) -> None:
        for s in list(self._queue):
            self._copy(s)


def make_copy_engine(n_slots: int, device: torch.device | str, stream_depth: int = 2):
    """The CUDA engine for a CUDA device, else the copy thread."""
    device = torch.device(device)
    if device.type == "cuda":
        return CudaCopyEngine(n_slots, device, stream_depth)
    return ThreadCopyEngine(n_slots)
