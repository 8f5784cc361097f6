"""Copy models of the replay: the simulator's side of the protocol's ``CopyLink``.

The per-layer protocol (``moe_runtime.core.protocol``) decides what is copied
and withdrawn; a copy model only says *when* copies finish. Each model has:

- the ``CopyLink`` commands: ``withdraw`` answers at once (is the copy still
  queued?); ``demand``, ``promote`` and ``prefetch`` are orders for the
  compute's current instant, in the order given;
- ``begin_layer(t)``, called before the protocol runs a layer, with the
  compute's instant ``t`` (which simpy's clock may not have reached yet: the
  replay yields only when a copy event falls at or before t; see replay.py);
- ``serve(waits, layer, t)``: carries out the layer's orders at ``t`` and
  waits for ``waits``; returns the instant the compute goes on (t + stall).
  A simpy generator, except where ``synchronous`` is True.

Start-up: a link may charge ``idle_s`` more to a copy that starts on an idle
engine than to one that starts the instant the engine's previous copy ends
(the storage link: a read behind another is pipelined with it by the reader
threads, so only a read that starts the disk pays its latency). Engines are
taken earliest-free first (ties: the lowest index) in both models, so the
same copies start idle.

Ties: at an instant t the compute sees every copy event of t first (its
wake-ups, ``wake_at``, have a priority after simpy's own): a copy finishing
at t is done, and an engine freed at t has already taken the next queued
copy. Both models compute every time with the same float operations in the
same order (start = max(engine free, issue instant), finish = start + copy
time), so their ties are the same ties.

``AnalyticCopies`` (the default): no simpy event per copy. Per engine the time
it is next free; a FIFO of queued prefetches; running copies in a heap of
finish times. Demand (and promoted) copies take the earliest-free engine at
once, so they go ahead of every queued prefetch; queued prefetches are given
engines lazily, in order, when the compute next looks (``begin_layer(t)``:
those whose engine is free at or before t start then, at that engine's free
time), and copies that finish by t mark their slots ready. The compute waits
for the latest finish of its waits: no simpy event at all. It equals
``EventCopies`` exactly (tests/test_sim_analytic.py).

``EventCopies`` (the reference): the copy engines are one simpy
``PriorityResource`` (capacity = copy engines, demand before prefetch, FIFO
within a priority); each copy is a process that holds an engine for latency +
bytes / bandwidth.

Hybrid execution (``backlog_s``, ``ready_in_s``: the protocol's questions
to the link; ``fill``: background copies of host-computed experts) is
modelled by ``AnalyticCopies`` only. Fills use engine 0's idle time only:
when the compute next looks (``begin_layer(t)``), after the queued
prefetches have started, the gap from the engine's free time to t goes to
the queued fills in order; a fill is paused (it keeps its progress) whenever
the engine has a demand copy or a prefetch, as a fill copied in chunks
between them would be. Fills never move an engine's free time, so no demand
copy or prefetch starts later for them. A promoted fill becomes a demand copy
of the whole expert.

``LockstepCopies``: no time at all; demand (and promoted) copies complete at
the wait, prefetches and fills in issue order at the next layer (all, or the
first ``per_layer``); the link has no backlog. The executor's ``LockstepEngine`` follows the same rule, so
the two halves' decisions can be compared one for one
(tests/test_differential.py).
"""

from __future__ import annotations

import heapq
import math
from collections import deque

from moe_runtime.core.expert_cache import READY, ExpertCache
from moe_runtime.core.keys import Key
from moe_runtime.core.timeline import Timeline

from .tiers import HostTier

DEMAND, PREFETCH, PROMOTE = 0, 1, 2  # PriorityResource: lower runs first
_AFTER_COPIES = 2  # event priority of the compute's wake-ups (simpy's own are URGENT=0, NORMAL=1)


def copy_time(copy_s: float, idle_s: float, start: float, free: float) -> float:
    """How long a copy starting at ``start`` on an engine free since ``free`` takes: ``idle_s`` more when
    the engine was idle (the one rule both copy models apply, so their floats are the same)."""
    return copy_s + idle_s if start > free else copy_s


def wake_at(env, t: float):
    """A simpy event at exactly ``t`` (>= env.now), processed after every other event of that instant,
    so the compute sees each copy that finishes at t done and each engine freed at t taken."""
    import simpy

    d = t - env.now
    while env.now + d < t:  # the delay whose sum with now is t itself, not a neighbouring float
        d = math.nextafter(d, math.inf)
    while env.now + d > t:
        d = math.nextafter(d, -math.inf)
    ev = simpy.Event(env)
    ev._ok, ev._value = True, None  # a triggered event, as simpy's Timeout makes one
    env.schedule(ev, _AFTER_COPIES, d)
    return ev


class EventCopies:
    """Copy engines as a simpy ``PriorityResource``; see the module docstring."""

    def __init__(self, env, cache: ExpertCache, *, engines: int, copy_s: float,
                 timeline: Timeline | None = None, fast: bool = True, idle_s: float = 0.0) -> None:
        import simpy

        self.env, self.cache, self.copy_s, self.timeline, self.fast = env, cache, copy_s, timeline, fast
        self.idle_s = idle_s
        self.n_engines = engines
        self.engines = simpy.PriorityResource(env, capacity=engines)
        self._free_engines = list(range(engines))
        self._freed_at = [-math.inf] * engines  # when each engine finished its last copy
        self._copies: dict[int, list] = {}  # slot -> [request, done event] of its outstanding copy
        self.orders: list[tuple[int, int, Key | None]] = []  # (kind, slot, key) to carry out in serve

    # -- CopyLink --------------------------------------------------------------------------
    def withdraw(self, slot: int) -> bool:
        if not self._queued(slot):
            return False
        self._copies.pop(slot)[0].cancel()
        return True

    def demand(self, slot: int, key: Key) -> None:
        self.orders.append((DEMAND, slot, key))

    def promote(self, slot: int) -> None:
        if self._queued(slot):
            self.orders.append((PROMOTE, slot, None))

    def prefetch(self, slot: int, key: Key) -> None:
        self.orders.append((PREFETCH, slot, key))

    # -- the compute's side ----------------------------------------------------------------
    def begin_layer(self, t: float = 0.0) -> None:
        pass  # copies mark their slots ready themselves, at their finish time

    def serve(self, waits: list[int], layer: int, t: float):
        """Carry out the layer's orders at instant ``t`` and wait for ``waits``; returns the instant after."""
        env, orders = self.env, self.orders
        if not orders and not waits:
            return t
        if self.fast and orders and not (self.engines.count or self.engines.queue) \
                and all(kind == DEMAND for kind, _, _ in orders) and (not self.idle_s or max(self._freed_at) < t):
            return self._demand_on_idle_engines(layer, t)  # nothing else can happen while the compute waits
        if t > env.now:
            yield wake_at(env, t)
        for kind, slot, key in orders:
            if kind == PROMOTE:  # a late prefetch not started: re-queued as demand, same done event
                req, done = self._copies[slot]
                req.cancel()
                self._issue(slot, self._key_of(slot), DEMAND, done)
            else:
                self._issue(slot, key, kind)
        orders.clear()
        state, copies = self.cache.state, self._copies
        for slot in waits:
            if state[slot] != READY:
                yield copies[slot][1]  # the compute waits for this expert's copy
        return env.now

    # -- internals -------------------------------------------------------------------------
    def _key_of(self, slot: int) -> Key:
        return self.cache.key_of[slot]

    def _queued(self, slot: int) -> bool:
        rec = self._copies.get(slot)
        return rec is not None and not rec[0].triggered

    def _issue(self, slot: int, key: Key, priority: int, done=None) -> None:
        """Queue a copy into ``slot``; ``done`` fires when it completes (kept when a copy is promoted)."""
        req = self.engines.request(priority=priority)
        done = done or self.env.event()
        self._copies[slot] = [req, done]
        self.env.process(self._copy(slot, key, priority, req, done))

    def _copy(self, slot: int, key: Key, priority: int, req, done):
        """Wait for an engine (``req``), hold it for one expert's copy, mark the slot ready."""
        env = self.env
        issued = env.now
        yield req  # a cancelled request never fires: the process simply ends with the run
        free, freed = self._free_engines, self._freed_at
        engine = min(free, key=lambda e: (freed[e], e))  # earliest free, as AnalyticCopies takes them
        free.remove(engine)
        start = env.now
        d = copy_time(self.copy_s, self.idle_s, start, freed[engine])
        yield env.timeout(d)
        freed[engine] = env.now
        free.append(engine)
        self.engines.release(req)
        self.cache.copy_done(slot)
        if self.timeline is not None:
            self.timeline.add(f"copy engine {engine}", f"L{key[0]} e{key[1]}", start, d,
                              kind="demand" if priority == DEMAND else "prefetch", issued_us=issued * 1e6)
        done.succeed()

    def _demand_on_idle_engines(self, layer: int, now: float) -> float:
        """Demand copies when no copy is running or queued: engine j takes copies j, j+n, ... back to
        back, so the instant they are all done is known without simpy events (the same float as the
        event path: each copy starts when the one before it on its engine finishes)."""
        n, freed = self.n_engines, self._freed_at
        # as _copy takes them: idle engines earliest-freed first, then (all freed at once) lowest index first
        order = sorted(range(n), key=lambda e: (freed[e], e))
        end = now
        for i, (_, slot, key) in enumerate(self.orders):
            e = order[i] if i < n else i % n
            if i % n == 0:  # a round: every engine free at once (idle in the first, back to back after)
                start = end
                d = copy_time(self.copy_s, self.idle_s, start, freed[e])
                end = start + d
            freed[e] = end
            self.cache.copy_done(slot)
            if self.timeline is not None:
                self.timeline.add(f"copy engine {e}", f"L{layer} e{key[1]}", start, d,
                                  kind="demand", issued_us=now * 1e6)
        self.orders.clear()
        return end


class LockstepCopies:
    """Copies that complete by rule, not by time; see the module docstring."""

    def __init__(self, cache: ExpertCache, per_layer: int | None = None) -> None:
        self.cache, self.per_layer = cache, per_layer
        self._queue: dict[int, bool] = {}  # slot -> demand, in issue order

    def withdraw(self, slot: int) -> bool:
        return self._queue.pop(slot, None) is not None

    def demand(self, slot: int, key: Key) -> None:
        self._queue[slot] = True

    def promote(self, slot: int) -> None:
        pass  # a queued copy completes at the wait anyway

    def prefetch(self, slot: int, key: Key) -> None:
        self._queue[slot] = False

    def fill(self, slot: int, key: Key) -> None:
        self._queue[slot] = False  # completes as a prefetch does, in issue order

    def backlog_s(self) -> float:
        return 0.0  # every demand copy completed at its wait

    def ready_in_s(self, slot: int) -> float | None:
        return None if slot in self._queue else 0.0

    def begin_layer(self, t: float = 0.0) -> None:
        for slot in [s for s, demand in self._queue.items() if not demand][: self.per_layer]:
            del self._queue[slot]
            self.cache.copy_done(slot)

    def serve(self, waits: list[int], layer: int, t: float):
        for slot in waits:
            self._queue.pop(slot, None)
            self.cache.copy_done(slot)
        return t
        yield  # a generator, like EventCopies.serve


class AnalyticCopies:
    """Copy engines as computed start and finish times; see the module docstring."""

    synchronous = True  # serve is a plain function: the compute waits on finish times it is told

    def __init__(self, cache: ExpertCache, *, engines: int, copy_s: float, timeline: Timeline | None = None,
                 source: HostTier | None = None, idle_s: float = 0.0) -> None:
        """``source``: the host tier a copy's expert must be in first (three tiers; tiers.py); ``idle_s``:
        the start-up a copy on an idle engine pays on top of ``copy_s``."""
        self.cache, self.copy_s, self.timeline, self.source = cache, copy_s, timeline, source
        self.idle_s = idle_s
        self.free_at = [-math.inf] * engines  # when each engine finishes the last copy given to it
        self.running: list[tuple] = []  # heap of (finish, seq, slot, engine, start, issued, demand)
        self.queue: deque = deque()  # queued prefetches, FIFO: [slot, key, issued, source ready]
        self.queued: dict[int, list] = {}  # slot -> its queue entry
        self.finish = [0.0] * cache.n_slots  # finish time of each slot's started copy
        self.now = 0.0  # the compute's instant, set by begin_layer
        self._seq = 0
        self.fill_q: deque = deque()  # fills not yet done, FIFO: [slot, key, issued, remaining seconds]
        self.fill_of: dict[int, list] = {}  # slot -> its fill entry
        self.fill_clock = -math.inf  # engine 0's idle time before this went to fills already

    # -- CopyLink --------------------------------------------------------------------------
    def withdraw(self, slot: int) -> bool:
        entry = self.queued.pop(slot, None)
        if entry is None:
            return False
        self.queue.remove(entry)
        return True

    def demand(self, slot: int, key: Key) -> None:
        ready = self.source.ready(key, self.now) if self.source is not None else 0.0
        self._start(slot, key, self.now, self.now, True, ready)

    def promote(self, slot: int) -> None:
        entry = self.queued.pop(slot, None)
        if entry is not None:  # not started: it becomes a demand copy, issued now
            self.queue.remove(entry)
            self._start(slot, entry[1], self.now, self.now, True, entry[3])
        elif self.fill_of:
            fill = self.fill_of.pop(slot, None)
            if fill is not None:  # a fill still under way: the compute needs it now, a demand copy
                self.fill_q.remove(fill)
                self._start(slot, fill[1], self.now, self.now, True)

    def prefetch(self, slot: int, key: Key) -> None:
        # three tiers: the expert is staged into host RAM as the prefetch is issued
        ready = self.source.ready(key, self.now) if self.source is not None else 0.0
        entry = [slot, key, self.now, ready]
        self.queue.append(entry)
        self.queued[slot] = entry

    def fill(self, slot: int, key: Key) -> None:
        """A background copy of a host-computed expert in the link's idle time (module docstring)."""
        entry = [slot, key, self.now, self.copy_s]  # remaining seconds of copy
        self.fill_q.append(entry)
        self.fill_of[slot] = entry

    def backlog_s(self) -> float:
        """Seconds until a demand copy issued now would start: queued prefetches do not count (a demand
        goes ahead of them); begin_layer has started those whose engine was free."""
        d = min(self.free_at) - self.now
        return d if d > 0 else 0.0

    def ready_in_s(self, slot: int) -> float | None:
        if slot in self.queued or slot in self.fill_of:
            return None
        d = self.finish[slot] - self.now
        return d if d > 0 else 0.0

    def _advance_fills(self, t: float) -> None:
        """Give engine 0's idle time up to ``t`` to the queued fills, in order; finished ones are done."""
        g = max(self.free_at[0], self.fill_clock, self.fill_q[0][2])
        q = self.fill_q
        while q and g < t:
            entry = q[0]
            if entry[2] > g:
                g = entry[2]
                continue
            d = min(entry[3], t - g)
            entry[3] -= d
            g += d
            if entry[3] <= 1e-15:
                q.popleft()
                slot, key, issued, _ = entry
                del self.fill_of[slot]
                self.cache.copy_done(slot)
                if self.timeline is not None:  # drawn as one span: from its first idle moment to its end
                    self.timeline.add("copy engine 0", f"L{key[0]} e{key[1]}", max(issued, g - self.copy_s),
                                      min(self.copy_s, g - issued), kind="fill", issued_us=issued * 1e6)
        self.fill_clock = t

    # -- the compute's side ----------------------------------------------------------------
    def begin_layer(self, t: float) -> None:
        """Bring the engines to instant ``t``: start queued prefetches whose engine freed before t,
        and mark ready the slots whose copy finished at or before t, in finish order."""
        self.now = t
        if self.queue:
            self._start_queued(t)
        if self.fill_q:
            self._advance_fills(t)
        run = self.running
        while run and run[0][0] <= t:
            self._done(heapq.heappop(run))

    def serve(self, waits: list[int], layer: int, t: float) -> float:
        """The compute waits until the last of ``waits`` finishes (each started or demanded by now)."""
        if not waits:
            return t
        fin = self.finish
        end = max(fin[s] for s in waits)
        return end if end > t else t

    def close(self, t: float) -> None:
        """The run ended at ``t``: copies finished by then are done (for the timeline)."""
        self.begin_layer(t)

    def busy_until(self) -> float:
        """When the engines run out of the copies given so far (running and queued), if none is added:
        the queued prefetches start as ``_start_queued`` would start them."""
        free = list(self.free_at)
        for _, _, issued, ready in self.queue:
            e = 0 if len(free) == 1 else min(range(len(free)), key=free.__getitem__)
            start = max(free[e], issued, ready)
            free[e] = start + copy_time(self.copy_s, self.idle_s, start, free[e])
        return max(free)

    # -- internals -------------------------------------------------------------------------
    def _engine(self) -> int:
        f = self.free_at
        return 0 if len(f) == 1 else min(range(len(f)), key=f.__getitem__)

    def _start(self, slot: int, key: Key, issued: float, t: float, demand: bool, ready: float = 0.0) -> None:
        """Give the copy the earliest-free engine, starting no earlier than ``t`` nor before its source is
        in host RAM (``ready``)."""
        e = self._engine()
        start = self.free_at[e] if self.free_at[e] > t else t
        if ready > start:
            start = ready
        self.free_at[e] = end = start + copy_time(self.copy_s, self.idle_s, start, self.free_at[e])
        self.finish[slot] = end
        self._seq += 1
        heapq.heappush(self.running, (end, self._seq, slot, e, start, issued, demand, key))

    def _start_queued(self, t: float) -> None:
        """Start queued prefetches, in order, on engines free at or before ``t``."""
        q, free = self.queue, self.free_at
        while q:
            e = self._engine()
            slot, key, issued, ready = q[0]
            start = free[e] if free[e] > issued else issued
            if ready > start:
                start = ready
            if start > t:
                return
            q.popleft()
            del self.queued[slot]
            self._start(slot, key, issued, start, False)

    def _done(self, rec: tuple) -> None:
        end, _, slot, engine, start, issued, demand, key = rec
        self.cache.copy_done(slot)
        if self.timeline is not None:
            self.timeline.add(f"copy engine {engine}", f"L{key[0]} e{key[1]}", start, end - start,
                              kind="demand" if demand else "prefetch", issued_us=issued * 1e6)
