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
priority queue (``os.preadv`` releases the GIL), each expert split into pieces
that the threads read in parallel. A failed or short read wakes every waiter
and surfaces on the compute thread as one MoeError line.

Identity: a source that carries a CRC-32 (a packed record, ``packed.Located``)
is checked once, by the reader thread that finishes its first read (zlib
releases the GIL), and remembered; a mismatch is one MoeError line naming the
layer and expert. Later reads of the record are not checked again.
"""

from __future__ import annotations

import heapq
import itertools
import mmap
import os
import threading
import time
import zlib
from collections import deque

import numpy as np
import torch
from torch import Tensor

from moe_runtime.core.errors import MoeError
from moe_runtime.model.formats import all_finite
from moe_runtime.offload.engines import CopyRecord
from moe_runtime.offload.packed import ALIGN, align_up


def aligned_bytes(nbytes: int) -> np.ndarray:
    """A page-aligned (so 4 KiB-aligned) zeroed uint8 array of ``nbytes`` (an anonymous mapping).

    The pages are faulted in now (MAP_POPULATE), not by the first direct read into them: a read
    into untouched memory pays for the page faults and measured ~4x slower here."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1), flags=flags), dtype=np.uint8)[:nbytes]


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


class _Read:
    """One expert's read: its pieces (file, offset, nbytes, position in the slot) are read by any threads."""

    __slots__ = ("slot", "demand", "gen", "dst", "pieces", "next", "left", "priority", "cancelled", "t0", "fetched",
                 "src", "check", "crc")

    def __init__(self, slot, demand, gen, dst, pieces, src, check, crc):
        self.slot, self.demand, self.gen, self.dst, self.pieces = slot, demand, gen, dst, pieces
        self.src = src
        self.crc = crc  # the CRC-32 the bytes must have at this first read of a packed record, else None
        self.check = check  # the slot's float dtype when its pieces are checked for NaN/inf as read, else None
        self.next = 0  # pieces started
        self.left = len(pieces)  # pieces not finished
        self.priority = 0 if demand else 1
        self.cancelled, self.t0, self.fetched = False, None, 0


class DiskReadEngine:
    """Reads experts from files into slots with ``threads`` reader threads; see the module docstring.

    An expert is split into pieces of about 1/``threads`` of it (4 KiB multiples), which the threads
    read in parallel, so one read alone gets the disk's parallelism too and reads complete in the
    order they were queued (demand first): the link behaves as one engine at the disk's full rate,
    which is how the simulator models it.
    """

    lanes = ("read",)
    needs_release = False  # the compute is synchronous on CPU

    def __init__(self, n_slots: int, paths: list[str], *, threads: int = 4, max_read: int,
                 direct: bool = True, check_finite: bool = True, verify: bool = True) -> None:
        """``check_finite``: the first read of each expert is checked for NaN/inf (a float expert);
        ``verify``: the first read of each source with a CRC (a packed record) is checked against it."""
        self.paths = list(paths)
        self.check_finite, self.verify = check_finite, verify
        self._checked: set[tuple] = set()  # the sources (their segments) already checked for NaN/inf
        self._verified: set[tuple] = set()  # the sources whose CRC matched
        self.fds, self.mode = open_files(self.paths, direct=direct)
        self.chunk = max(ALIGN, align_up(-(-max_read // threads)))
        self._done = [threading.Event() for _ in range(n_slots)]
        self._active: dict[int, _Read] = {}  # slot -> its read, until finished or withdrawn
        self._heap: list[list] = []  # [priority, seq, read]; an entry whose priority is not the read's is stale
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
        bounce = self.chunk + 2 * ALIGN  # a piece over-read to aligned bounds
        self._workers = [threading.Thread(target=self._run, args=(aligned_bytes(bounce),), name=f"moe-read-{i}",
                                          daemon=True) for i in range(threads)]
        for w in self._workers:
            w.start()

    # -- the compute thread's side ------------------------------------------------------
    def submit(self, slot: int, src, dst: Tensor, demand: bool) -> None:
        pieces, pos = [], 0
        for f, offset, n in src:
            for a in range(0, n, self.chunk):
                pieces.append((f, offset + a, min(self.chunk, n - a), pos + a))
            pos += n
        if pos != dst.numel() * dst.element_size():
            raise MoeError(f"internal: the expert's segments hold {pos:,} bytes, its slot "
                           f"{dst.numel() * dst.element_size():,}")
        with self._cv:  # under the lock: a reader finishing this slot's previous read cannot set it again
            self._raise()  # a reader failed (its error woke every waiter): no thread may be left to read this
            self._done[slot].clear()
            self._gen[slot] += 1
            # by value: a source object's id may be reused by another expert's once it is freed
            check = dst.dtype if self.check_finite and dst.is_floating_point() and tuple(src) not in self._checked \
                else None
            crc = getattr(src, "crc", None) if self.verify and tuple(src) not in self._verified else None
            req = _Read(slot, demand, self._gen[slot], dst.view(torch.uint8).numpy(), pieces, src, check, crc)
            self._outstanding.add(slot)
            self._active[slot] = req
            heapq.heappush(self._heap, [req.priority, next(self._seq), req])
            self._cv.notify_all()

    def cancel_if_queued(self, slot: int) -> bool:
        with self._cv:
            req = self._active.get(slot)
            if req is None or req.next > 0:
                return False  # started (or finished): it will complete
            req.cancelled = True  # its heap entry is dropped when it surfaces
            del self._active[slot]
            self._outstanding.discard(slot)
            return True

    def promote(self, slot: int) -> None:
        with self._cv:
            req = self._active.get(slot)
            if req is not None and req.priority != 0 and req.next < len(req.pieces):
                req.priority = 0  # the old entry is now stale
                heapq.heappush(self._heap, [0, next(self._seq), req])
                self._cv.notify_all()

    def poll(self) -> list[int]:
        if not self._finished and self._error is None:
            return []
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
        """Drain every queued and running read (so the counts are whole), then stop the threads."""
        with self._cv:
            while self._active and self._error is None and any(w.is_alive() for w in self._workers):
                self._cv.wait(timeout=1.0)
            self._stop = True
            self._cv.notify_all()
        for w in self._workers:
            w.join(timeout=5)
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def _raise(self) -> None:
        """The first reader error as one MoeError (also from ``submit``: its read would never run)."""
        if self._error is not None:
            raise MoeError(f"reading experts from {', '.join(self.paths)} failed: {self._error}")

    # -- reader threads -----------------------------------------------------------------
    def _next_piece(self):
        """(read, piece) to do next, or None; called with the lock held."""
        heap = self._heap
        while heap:
            prio, _, req = heap[0]
            if req.cancelled or prio != req.priority or req.next >= len(req.pieces):
                heapq.heappop(heap)  # withdrawn, promoted (stale entry) or fully started
                continue
            piece = req.pieces[req.next]
            if req.next == 0:
                req.t0 = time.perf_counter() - self.base
            req.next += 1
            if req.next == len(req.pieces):
                heapq.heappop(heap)
            return req, piece
        return None

    def _run(self, bounce: np.ndarray) -> None:
        while True:
            with self._cv:
                job = None
                while not self._stop and (job := self._next_piece()) is None:
                    self._cv.wait()
                if self._stop:
                    return
            req, piece = job
            try:
                fetched = self._read(piece, req.dst, bounce)
                # each piece checked by the thread that read it, in parallel: garbage in would decode to garbage
                # out, and one pass over a whole expert after its read would cost more than the read
                if req.check is not None and not all_finite(piece_tensor(req, piece)):
                    raise ValueError(f"{getattr(req.src, 'name', 'an expert')} holds non-finite values (NaN or inf)")
                with self._cv:
                    req.fetched += fetched
                    req.left -= 1
                    last = req.left == 0
                if not last:
                    continue
                # the record's last piece: its CRC over the whole slot, outside the lock (zlib releases the GIL)
                if req.crc is not None and zlib.crc32(req.dst) != req.crc:
                    raise ValueError(f"{getattr(req.src, 'name', 'an expert')} is damaged (its CRC-32 does not "
                                     "match the one packed with it): run `moe-runtime pack` again")
            except BaseException as e:  # wake every waiter: a silent death would hang the compute
                with self._cv:  # under the lock, so no submit after this can wait for a read nobody does
                    self._error = self._error or e
                    for done in self._done:
                        done.set()
                    self._cv.notify_all()
                return
            with self._cv:
                if req.check is not None:
                    self._checked.add(tuple(req.src))
                if req.crc is not None:
                    self._verified.add(tuple(req.src))
                t1 = time.perf_counter() - self.base
                self.bytes_read += req.fetched
                self.records.append(CopyRecord(req.slot, req.demand, req.t0, t1, req.fetched, "read"))
                # set before the report, under the lock: once the compute can see this read finished (and
                # reuse the slot), no late set() from this thread can mark a newer read of the slot done
                self._done[req.slot].set()
                self._finished.append((req.slot, req.gen))
                if self._active.get(req.slot) is req:
                    del self._active[req.slot]
                self._cv.notify_all()  # a draining close() waits for this

    def _read(self, piece, out: np.ndarray, bounce: np.ndarray) -> int:
        """Read one piece into its place in the slot's bytes ``out``; returns the bytes fetched from storage."""
        f, offset, n, pos = piece
        start, end = offset - offset % ALIGN, align_up(offset + n)
        target = out[pos:pos + n]
        direct = start == offset and n % ALIGN == 0 and target.ctypes.data % ALIGN == 0
        buf = target if direct else bounce[: end - start]
        got = os.preadv(self.fds[f], [buf], start)
        if got < (n if direct else offset - start + n):
            raise EOFError(f"short read of {self.paths[f]} at {offset:,} ({got:,} of {n:,} bytes)")
        if not direct:
            target[:] = bounce[offset - start: offset - start + n]
        return len(buf)


def piece_tensor(req: _Read, piece) -> Tensor:
    """The slot's bytes one piece filled, as its float dtype (a piece starts and ends on an element: pieces
    split whole tensors at 4 KiB multiples, and the caller checked that the tensors share the slot's dtype)."""
    _, _, n, pos = piece
    return torch.from_numpy(req.dst[pos:pos + n]).view(req.check)


def measure_read(path: str | list[str], segments: list, record_bytes: int, *, depth: int = 4,
                 seconds: float = 2.0) -> tuple[float, float, str]:
    """Direct-I/O read bandwidth (GB/s, decimal) at ``depth`` reads in flight, and the time of one read alone.

    Reads the experts at ``segments`` (each one expert's byte ranges) through ``DiskReadEngine``, the
    engine the executor uses, so the figures include its hand-off. Returns (GB/s, seconds of the
    fastest of five single reads, mode); a latency is that time minus the record at the bandwidth."""
    pool = aligned_pool(depth, record_bytes, torch.uint8)
    eng = DiskReadEngine(depth, [path] if isinstance(path, str) else list(path), threads=depth, max_read=record_bytes,
                         verify=False)  # the link's rate, not the first read's CRC (docs/executor.md states it)
    try:
        t0, i, done = time.perf_counter(), 0, 0
        for s in range(depth):
            eng.submit(s, segments[i % len(segments)], pool[s], demand=False)
            i += 1
        while time.perf_counter() - t0 < seconds:
            for s in range(depth):
                eng.wait(s)
                done += 1
                eng.submit(s, segments[i % len(segments)], pool[s], demand=False)
                i += 1
        for s in range(depth):
            eng.wait(s)
            done += 1
        wall = time.perf_counter() - t0
        gbps = eng.bytes_read / wall / 1e9
        alone = []
        for j in range(5):
            t = time.perf_counter()
            eng.submit(0, segments[(i + j) % len(segments)], pool[0], demand=True)
            eng.wait(0)
            alone.append(time.perf_counter() - t)
        return gbps, min(alone), eng.mode
    finally:
        eng.close()
