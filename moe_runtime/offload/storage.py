"""The storage link: reads experts from files into slots, behind the copy-engine interface.

Contract (the engine interface of ``engines.py``): ``submit(slot, src, dst,
demand)`` where ``src`` is the expert's segments ``((file, offset, nbytes),
...)`` (``packed.py``) and ``dst`` the slot's flat host tensor; demand reads go
ahead of every queued prefetch; ``cancel_if_queued`` withdraws a read not yet
started; ``promote`` moves a queued prefetch ahead as demand; ``poll`` reports
finished reads without waiting; ``wait`` blocks for one slot; ``records`` has
one ``CopyRecord`` per finished read; ``bytes_read`` counts bytes fetched from
storage (over-reads included).

Honest reads: files are opened with ``O_DIRECT`` so reads bypass the page
cache; a read is issued at 4 KiB-aligned offsets and lengths into an aligned
buffer (straight into the slot when the slot is aligned and the segment is
whole, else into a per-thread bounce buffer, then copied). Where the file
system refuses ``O_DIRECT``, the files are opened normally and their cached
pages dropped (``posix_fadvise(DONTNEED)``) before the run; ``mode`` says which
ran. Several reads are in flight at once: ``threads`` reader threads share one
priority queue (``os.preadv`` releases the GIL). A failed or short read wakes
every waiter and surfaces on the compute thread as one MoeError line.
"""

from __future__ import annotations

import heapq
import itertools
import mmap
import os
import threading
import time
from collections import deque

import numpy as np
import torch
from torch import Tensor

from moe_runtime.errors import MoeError
from moe_runtime.offload.engines import CopyRecord
from moe_runtime.offload.packed import ALIGN, align_up


def aligned_bytes(nbytes: int) -> np.ndarray:
    """A page-aligned (so 4 KiB-aligned) zeroed uint8 array of ``nbytes`` (an anonymous mapping)."""
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=np.uint8)[:nbytes]


def aligned_pool(n_slots: int, numel: int, dtype: torch.dtype) -> Tensor:
    """A [n_slots, numel] tensor on page-aligned memory (rows aligned when a row is a multiple of 4 KiB)."""
    item = torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(aligned_bytes(n_slots * numel * item), dtype=dtype).view(n_slots, numel)


def open_files(paths: list[str], *, direct: bool = True) -> tuple[list[int], str]:
    """Open ``paths`` read-only for honest reads; returns (fds, mode) with mode ``direct`` or ``dropped-cache``."""
    fds, mode = [], "direct"
    for p in paths:
        fd = None
        if direct and hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
            except OSError:
                fd = None  # e.g. tmpfs refuses O_DIRECT
        if fd is None:
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError as e:
                raise MoeError(f"cannot open {p}: {e.strerror}") from None
            mode = "dropped-cache"
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # later reads come from the device
        fds.append(fd)
    return fds, mode


class DiskReadEngine:
    """Reads experts from files into slots with ``threads`` reader threads; see the module docstring."""

    lanes = ("read",)

    def __init__(self, n_slots: int, paths: list[str], *, threads: int = 4, max_read: int,
                 direct: bool = True) -> None:
        self.paths = list(paths)
        self.fds, self.mode = open_files(self.paths, direct=direct)
        self._done = [threading.Event() for _ in range(n_slots)]
        self._queued: dict[int, list] = {}  # slot -> heap entry, while not started
        self._heap: list[list] = []  # [priority, seq, slot, src, dst, demand, cancelled, gen]
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._outstanding: set[int] = set()
        self._gen = [0] * n_slots
        self._finished: deque[tuple[int, int]] = deque()
        self.records: list[CopyRecord] = []
        self.bytes_read = 0
        self._stop = False
        self._error: BaseException | None = None
        self.base = time.perf_counter()
        bounce = align_up(max_read) + 2 * ALIGN  # a segment over-read to aligned bounds
        self._workers = [threading.Thread(target=self._run, args=(aligned_bytes(bounce),), name=f"moe-read-{i}",
                                          daemon=True) for i in range(threads)]
        for w in self._workers:
            w.start()

    # -- the compute thread's side ------------------------------------------------------
    def submit(self, slot: int, src, dst: Tensor, demand: bool) -> None:
        self._done[slot].clear()
        self._gen[slot] += 1
        entry = [0 if demand else 1, next(self._seq), slot, src, dst, demand, False, self._gen[slot]]
        with self._cv:
            self._outstanding.add(slot)
            self._queued[slot] = entry
            heapq.heappush(self._heap, entry)
            self._cv.notify()

    def cancel_if_queued(self, slot: int) -> bool:
        with self._cv:
            entry = self._queued.pop(slot, None)
            if entry is None:
                return False
            entry[6] = True  # skipped when popped
            self._outstanding.discard(slot)
            return True

    def promote(self, slot: int) -> None:
        with self._cv:
            entry = self._queued.get(slot)
            if entry is not None and entry[0] != 0:
                entry[6] = True
                promoted = [0, next(self._seq), *entry[2:6], False, entry[7]]
                self._queued[slot] = promoted
                heapq.heappush(self._heap, promoted)
                self._cv.notify()

    def poll(self) -> list[int]:
        out = []
        with self._cv:
            while self._finished:
                s, gen = self._finished.popleft()
                if gen == self._gen[s] and s in self._outstanding:
                    self._outstanding.discard(s)
                    out.append(s)
        self._raise()
        return out

    def wait(self, slot: int) -> None:
        # CPU waits on the storage here: block until this slot's read has finished
        self._done[slot].wait()
        self._raise()
        with self._cv:
            self._outstanding.discard(slot)

    def slot_released(self, slot: int) -> None:
        pass  # the compute is synchronous on CPU

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for w in self._workers:
            w.join(timeout=5)
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def _raise(self) -> None:
        if self._error is not None:
            raise MoeError(f"reading experts from {', '.join(self.paths)} failed: {self._error}")

    # -- reader threads -----------------------------------------------------------------
    def _run(self, bounce: np.ndarray) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._heap:
                    self._cv.wait()
                if self._stop:
                    return
                entry = heapq.heappop(self._heap)
                if entry[6]:
                    continue
                _, _, slot, src, dst, demand, _, gen = entry
                del self._queued[slot]
            t0 = time.perf_counter() - self.base
            try:
                nbytes = self._read(src, dst, bounce)
            except BaseException as e:  # wake every waiter: a silent death would hang the compute
                self._error = e
                for done in self._done:
                    done.set()
                return
            t1 = time.perf_counter() - self.base
            with self._cv:
                self.bytes_read += nbytes
                self.records.append(CopyRecord(slot, demand, t0, t1, nbytes, "read"))
                self._finished.append((slot, gen))
            self._done[slot].set()

    def _read(self, segments, dst: Tensor, bounce: np.ndarray) -> int:
        """Read ``segments`` end to end into ``dst``; returns the bytes fetched from storage."""
        out = dst.view(torch.uint8).numpy()  # the slot's bytes, shared with the tensor
        pos = fetched = 0
        for f, offset, n in segments:
            start, end = offset - offset % ALIGN, align_up(offset + n)
            target = out[pos:pos + n]
            direct = (start == offset and n % ALIGN == 0 and target.ctypes.data % ALIGN == 0)
            buf = target if direct else bounce[: end - start]
            got = os.preadv(self.fds[f], [buf], start)
            if got < (n if direct else offset - start + n):
                raise EOFError(f"short read of {self.paths[f]} at {offset:,} ({got:,} of {n:,} bytes)")
            if not direct:
                target[:] = bounce[offset - start: offset - start + n]
            fetched += len(buf)
            pos += n
        if pos != out.size:
            raise ValueError(f"segments hold {pos:,} bytes, the slot {out.size:,}")
        return fetched
