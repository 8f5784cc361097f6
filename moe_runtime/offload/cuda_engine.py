"""The CUDA copy engine (dedicated streams and events) and ``make_copy_engine``; the contract every copy
engine keeps is in engines.py."""

from __future__ import annotations

from collections import deque

import torch
from torch import Tensor

from moe_runtime.offload.engines import FILL_CHUNKS, CopyRecord, ThreadCopyEngine


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
        self._fills: deque[list] = deque()  # [slot, src, dst, offset]: fills not yet wholly on the stream
        self._fill_ev = torch.cuda.Event()  # the last fill chunk put on the prefetch stream
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

    def fill(self, slot: int, src: Tensor, dst: Tensor) -> None:
        self._retire(slot)  # before its first chunk re-records the slot's start event
        self._fills.append([slot, src, dst, 0])
        self._pump()

    def backlog(self) -> int:
        self._reap()
        return sum(1 for demand, _ in self._on_stream.values() if demand)

    def ready_in(self, slot: int, copy_s: float) -> float | None:
        if any(s == slot for s, _, _ in self._queue) or any(f[0] == slot for f in self._fills):
            return None
        if slot not in self._on_stream or self._end[slot].query():
            return 0.0
        # on a stream: the GPU does not say how far a copy has got; half its time once it has started
        return copy_s / 2 if self._start[slot].query() else copy_s

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
        for i, (s, src, dst, offset) in enumerate(self._fills):  # a fill: its rest becomes a demand copy
            if s == slot:
                del self._fills[i]
                if offset:  # its chunks so far are on the prefetch stream: the rest follows them
                    self.demand_stream.wait_event(self._fill_ev)
                self._launch(self.demand_stream, s, src, dst, True, offset)
                return

    def wait(self, slot: int) -> None:
        if not self.is_done(slot) and slot not in self._on_stream:
            self.promote(slot)  # still queued: its end event is not recorded yet, so waiting on it would not wait
        # the compute stream (not the CPU) waits here, for this slot's copy event only
        torch.cuda.current_stream(self.device).wait_event(self._end[slot])
        self._reap()  # keep the prefetch stream fed
        self._pump()

    def is_done(self, slot: int) -> bool:
        return slot not in self._on_stream and not any(s == slot for s, _, _ in self._queue) \
            and not any(f[0] == slot for f in self._fills)

    def slot_released(self, slot: int) -> None:
        self._released[slot].record(torch.cuda.current_stream(self.device))
        self._ever_used[slot] = True

    def close(self) -> None:
        while self._fills:  # fills still queued go on the stream whole: every copy the cache counted runs
            slot, src, dst, offset = self._fills.popleft()
            self._launch(self.prefetch_stream, slot, src, dst, False, offset)
        # CPU waits on the GPU here: the copy streams drain before the engine goes away
        self.demand_stream.synchronize()
        self.prefetch_stream.synchronize()
        for s in list(self._on_stream):
            self._complete(s)

    def _launch(self, stream, slot: int, src: Tensor, dst: Tensor, demand: bool, offset: int = 0) -> None:
        """Put the copy of ``src[offset:]`` into ``dst`` on ``stream`` (offset > 0: a fill's rest, whose
        start event and release wait were recorded with its first chunk)."""
        if not offset:
            self._retire(slot)
        with torch.cuda.stream(stream):
            if not offset:
                self._begin(stream, slot)
            dst[offset:].copy_(src[offset:], non_blocking=True)  # one pinned host -> device copy
            self._end[slot].record(stream)
        self._on_stream[slot] = (demand, src.numel() * src.element_size())
        if not demand:
            self._prefetch_on_stream += 1

    def _retire(self, slot: int) -> None:
        """Forget the slot's previous copy before a new one re-records its events."""
        if slot in self._reaped:  # that report was of the slot's previous copy: never report it for this one
            self._reaped.remove(slot)
        if slot in self._on_stream:
            # CPU waits on the GPU here (rare): the slot's previous copy was used and released before a
            # poll saw it complete; its events are about to be re-recorded, so read its times first
            self._end[slot].synchronize()
            self._complete(slot)

    def _begin(self, stream, slot: int) -> None:
        if self._ever_used[slot]:
            stream.wait_event(self._released[slot])  # do not overwrite weights the compute may still read
        self._start[slot].record(stream)

    def _pump(self) -> None:
        while self._queue and self._prefetch_on_stream < self.stream_depth:
            slot, src, dst = self._queue.popleft()
            self._launch(self.prefetch_stream, slot, src, dst, False)
        if self._fills and not self._queue and not self._on_stream and self._fill_ev.query():
            self._fill_chunk()  # the link is idle: one more chunk of the oldest fill

    def _fill_chunk(self) -> None:
        """The next chunk (a quarter of the expert) of the oldest fill on the prefetch stream; its last chunk
        is launched as a copy of the rest, which completes the slot as any copy does."""
        f = self._fills[0]
        slot, src, dst, offset = f
        step = -(-src.numel() // FILL_CHUNKS)
        if offset + step >= src.numel():
            self._fills.popleft()
            self._launch(self.prefetch_stream, slot, src, dst, False, offset)
            return
        with torch.cuda.stream(self.prefetch_stream):
            if not offset:
                self._begin(self.prefetch_stream, slot)
            dst[offset:offset + step].copy_(src[offset:offset + step], non_blocking=True)
            self._fill_ev.record(self.prefetch_stream)
        f[3] = offset + step

    def _complete(self, slot: int) -> None:
        demand, nbytes = self._on_stream.pop(slot)
        if not demand:
            self._prefetch_on_stream -= 1
        t0 = self.base.elapsed_time(self._start[slot]) / 1e3
        t1 = self.base.elapsed_time(self._end[slot]) / 1e3
        self.records.append(CopyRecord(slot, demand, t0, t1, nbytes, "copy:demand" if demand else "copy:prefetch"))


def make_copy_engine(n_slots: int, device: torch.device | str, stream_depth: int = 2):
    """The CUDA engine for a CUDA device, else the copy thread."""
    device = torch.device(device)
    if device.type == "cuda":
        return CudaCopyEngine(n_slots, device, stream_depth)
    return ThreadCopyEngine(n_slots)
