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
- Hybrid execution asks three more things (``core/protocol.py``'s ``CopyLink``):
  ``backlog()``, the copies a demand copy issued now would wait behind;
  ``ready_in(slot, copy_s)``, seconds until the copy into ``slot`` is done
  (None while it is still queued, so promoting it is the alternative); and
  ``fill(slot, src, dst)``, a background copy that runs only while the link
  has no demand copy or prefetch to carry: it is copied in chunks and pauses
  between them whenever one waits, and ``promote`` makes its rest a demand.
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

from torch import Tensor


FILL_CHUNK_BYTES = 1 << 20  # the copy thread's fills pause for a demand copy or a prefetch at most this often
FILL_CHUNKS = 4  # the CUDA engine's fills go on the stream in this many chunks, one per idle moment


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
        # [priority (0 demand, 1 prefetch, 2 fill), seq, slot, src, dst, demand, cancelled, gen, offset, t0]
        self._heap: list[list] = []
        self._running: list | None = None  # the entry being copied
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
        self._enqueue(slot, src, dst, demand, 0 if demand else 1)

    def _enqueue(self, slot: int, src: Tensor, dst: Tensor, demand: bool, prio: int) -> None:
        self._done[slot].clear()
        self._gen[slot] += 1
        entry = [prio, next(self._seq), slot, src, dst, demand, False, self._gen[slot], 0, None]
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

    def fill(self, slot: int, src: Tensor, dst: Tensor) -> None:
        self._enqueue(slot, src, dst, False, 2)

    def backlog(self) -> int:
        with self._lock:  # the worker is one lane: a running copy of any kind delays a demand copy
            run = self._running  # (a fill pauses for it at its next chunk)
            return (run is not None and run[0] != 2) + sum(1 for e in self._queued.values() if e[0] == 0)

    def ready_in(self, slot: int, copy_s: float) -> float | None:
        with self._lock:
            if slot in self._queued:
                return None
            run = self._running
            if run is not None and run[2] == slot:
                left = copy_s * (1 - run[8] / max(run[3].numel(), 1))  # the part not copied yet
                if run[0] == 2 or run[8] or run[9] is None:  # a fill (or a fill's rest) moves by chunks: offset
                    return left
                return max(left - (self.clock() - self.base - run[9]), 0.0)  # one piece: less the time it ran
            return 0.0

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
            if entry is not None and entry[0] != 0:  # a queued prefetch (or fill) the compute needs now: demand
                entry[6] = True
                promoted = [0, next(self._seq), *entry[2:6], False, *entry[7:]]
                self._queued[slot] = promoted
                heapq.heappush(self._heap, promoted)
                self._cv.notify()
            elif entry is None and self._running is not None and self._running[2] == slot:
                self._running[0] = 0  # a fill being copied: it no longer pauses for other copies

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
                _, _, slot, src, dst, demand, _, gen, _, t0 = entry
                del self._queued[slot]
                self._running = entry
            if t0 is None:  # a paused fill keeps its first start
                t0 = entry[9] = self.clock() - self.base
            try:
                finished = self._copy(entry)
            except BaseException as e:  # wake every waiter: a silent death would hang the compute
                self._error = e
                for done in self._done:
                    done.set()
                return
            if not finished:  # a fill paused for a demand copy or a prefetch: back in the queue, its progress kept
                continue
            t1 = self.clock() - self.base
            self.records.append(CopyRecord(slot, demand, t0, t1, src.numel() * src.element_size(), "copy"))
            self._done[slot].set()  # before the report, so a polled slot's flag is already set
            with self._lock:
                self._running = None
                self._finished.append((slot, gen))

    def _copy(self, entry: list) -> bool:
        """Copy ``entry``; a fill goes in chunks and pauses (re-queued, offset kept) when another copy
        waits. True when the copy is complete."""
        src, dst = entry[3], entry[4]
        if entry[0] != 2:
            dst[entry[8]:].copy_(src[entry[8]:])
            return True
        step = max(FILL_CHUNK_BYTES // src.element_size(), 1)
        n = src.numel()
        while entry[8] < n:
            a = entry[8]
            dst[a:a + step].copy_(src[a:a + step])
            entry[8] = min(a + step, n)
            with self._cv:
                if entry[8] < n and entry[0] == 2 and any(e[0] < 2 for e in self._queued.values()):
                    self._running = None  # it keeps its sequence number: ahead of the fills queued after it
                    self._queued[entry[2]] = entry
                    heapq.heappush(self._heap, entry)
                    return False
        return True


class LockstepEngine:
    """A deterministic engine for differential tests: copies complete by rule, not by time.

    A demand (or promoted) copy completes when the compute waits for it; prefetches (and fills) complete
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

    def fill(self, slot: int, src: Tensor, dst: Tensor) -> None:
        self._queue[slot] = (src, dst, False)  # completes as a prefetch does, in issue order

    def backlog(self) -> int:
        return 0  # every demand copy completed at its wait

    def ready_in(self, slot: int, copy_s: float) -> float | None:
        return None if slot in self._queue else 0.0

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
