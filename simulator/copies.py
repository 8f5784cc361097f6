"""Copy models of the replay: the simulator's side of the protocol's ``CopyLink``.

The per-layer protocol (``moe_runtime.cache.protocol``) decides what is copied
and withdrawn; a copy model only says *when* copies finish. Each model has:

- the ``CopyLink`` commands: ``withdraw`` answers at once (is the copy still
  queued?); ``demand``, ``promote`` and ``prefetch`` are orders, carried out
  by ``serve`` at the compute's current instant, in the order given;
- ``begin_layer()``, called before the protocol runs a layer;
- ``serve(waits, layer, pending)``, a simpy generator that carries out the
  layer's orders and waits for ``waits``; it returns (stall seconds, compute
  seconds still pending). ``pending`` is compute time not yet yielded to
  simpy (the replay batches it; see replay.py).

``EventCopies``: the copy engines are one simpy ``PriorityResource`` (capacity
= copy engines, demand before prefetch, FIFO within a priority); each copy is
a process that holds an engine for latency + bytes / bandwidth.

``LockstepCopies``: no time at all; demand (and promoted) copies complete at
the wait, prefetches in issue order at the next layer (all, or the first
``per_layer``). The executor's
``LockstepEngine`` follows the same rule, so the two halves' decisions can be
compared one for one (tests/test_differential.py).
"""

from __future__ import annotations

from moe_runtime.cache.expert_cache import READY, ExpertCache
from moe_runtime.cache.policies import Key
from moe_runtime.timeline import Timeline

DEMAND, PREFETCH, PROMOTE = 0, 1, 2  # PriorityResource: lower runs first


class EventCopies:
    """Copy engines as a simpy ``PriorityResource``; see the module docstring."""

    def __init__(self, env, cache: ExpertCache, *, engines: int, copy_s: float,
                 timeline: Timeline | None = None, fast: bool = True) -> None:
        import simpy

        self.env, self.cache, self.copy_s, self.timeline, self.fast = env, cache, copy_s, timeline, fast
        self.n_engines = engines
        self.engines = simpy.PriorityResource(env, capacity=engines)
        self._free_engines = list(range(engines - 1, -1, -1))
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
    def begin_layer(self) -> None:
        pass  # copies mark their slots ready themselves, at their finish time

    def serve(self, waits: list[int], layer: int, pending: float):
        """Carry out the layer's orders at env.now + pending and wait for ``waits``; (stall, pending)."""
        env, orders = self.env, self.orders
        if not orders and not waits:
            return 0.0, pending
        if self.fast and orders and not (self.engines.count or self.engines.queue) \
                and all(kind == DEMAND for kind, _, _ in orders):
            stall = self._demand_on_idle_engines(layer, env.now + pending)
            return stall, pending + stall  # nothing else can happen while the compute waits
        if pending:
            yield env.timeout(pending)
        for kind, slot, key in orders:
            if kind == PROMOTE:  # a late prefetch not started: re-queued as demand, same done event
                req, done = self._copies[slot]
                req.cancel()
                self._issue(slot, self._key_of(slot), DEMAND, done)
            else:
                self._issue(slot, key, kind)
        orders.clear()
        t0 = env.now
        state, copies = self.cache.state, self._copies
        for slot in waits:
            if state[slot] != READY:
                yield copies[slot][1]  # the compute waits for this expert's copy
        return env.now - t0, 0.0

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
        engine = self._free_engines.pop()
        start = env.now
        yield env.timeout(self.copy_s)
        self._free_engines.append(engine)
        self.engines.release(req)
        self.cache.copy_done(slot)
        if self.timeline is not None:
            self.timeline.add(f"copy engine {engine}", f"L{key[0]} e{key[1]}", start, self.copy_s,
                              kind="demand" if priority == DEMAND else "prefetch", issued_us=issued * 1e6)
        done.succeed()

    def _demand_on_idle_engines(self, layer: int, now: float) -> float:
        """Demand copies when no copy is running or queued: engine j takes copies j, j+n, ... back to
        back, so the stall is known without simpy events (same result as the event path)."""
        n, cs = self.n_engines, self.copy_s
        for i, (_, slot, key) in enumerate(self.orders):
            self.cache.copy_done(slot)
            if self.timeline is not None:
                self.timeline.add(f"copy engine {i % n}", f"L{layer} e{key[1]}", now + (i // n) * cs, cs,
                                  kind="demand", issued_us=now * 1e6)
        stall = -(-len(self.orders) // n) * cs
        self.orders.clear()
        return stall


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

    def begin_layer(self) -> None:
        for slot in [s for s, demand in self._queue.items() if not demand][: self.per_layer]:
            del self._queue[slot]
            self.cache.copy_done(slot)

    def serve(self, waits: list[int], layer: int, pending: float):
        for slot in waits:
            self._queue.pop(slot, None)
            self.cache.copy_done(slot)
        return 0.0, pending
        yield  # a generator, like EventCopies.serve
