"""The per-layer protocol: everything that is decided at a MoE layer, in one place, for both clocks.

At each MoE layer of a step, in this order (DESIGN.md):

1. classify and pin: every expert of the (step, layer) (a batch's union) is a
   hit, a late prefetch or a miss, and all of them are pinned before any
   eviction;
2. withdraw stale queued prefetches (their layer has passed unused); a
   withdrawn slot is free again, so the misses below can take it;
3. decide each miss (miss policy ``copy``, ``host`` or ``auto``): copy it, or
   compute it on the host (``_decide``: the one cost rule, below);
4. demand copies for the misses to copy, ahead of every queued prefetch; a
   late prefetch not yet started is promoted to demand;
5. ask the predictor (which has seen this layer's experts) and admit the
   prefetches the cache allows (never into a host layer);
6. in ``auto``, fills: host-computed misses copied into the cache in the
   background, at the lowest priority: the link gives them only time it would
   sit idle, so they never delay a demand copy or a prefetch (the link pauses
   a fill for either); fills and prefetches in flight share ``max_inflight``;
7. the caller computes the HOST experts on the host while it waits for the
   slots returned (this layer's copied misses and late prefetches) and
   computes the rest on the device; then ``end_layer`` (unpin).

The cost rule (``auto``), per expert in access order, with ``n`` the expert's
tokens in the step: the host finishes it at ``H + host_s(n)`` (H: the host
work this layer already has), a copy at ``L + copy_s + device_s(n)`` (L: the
link's demand backlog plus the copies chosen so far this layer); the smaller
wins. A late prefetch compares the host with the rest of its copy (or, still
queued, with its promotion). ``host`` sends every miss to the host (late
prefetches still wait: their copy is under way); ``copy`` is the protocol as
it was. Host layers (``host_layers``) skip the cache: their experts are all
computed on the host and take no slot.

``LayerProtocol`` makes these decisions; a ``CopyLink`` carries them out. The
executor's link is its copy engine (CUDA streams or a copy thread) and the
simulator's is simpy; neither re-decides anything. This module imports no
torch and reads no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from moe_runtime.core.errors import MoeError
from moe_runtime.core.expert_cache import ExpertCache, Outcome
from moe_runtime.core.keys import Key
from moe_runtime.core.predictors.base import PredictContext, Predictor, RoutingHistory, plan_prefetch

_HIT, _LATE, _MISS, _HOST = Outcome.HIT, Outcome.LATE, Outcome.MISS, Outcome.HOST


@dataclass(frozen=True)
class HostCost:
    """What the cost rule knows, in seconds: the host's time for one expert at n tokens (host profile,
    expert format), one expert's copy on the link, and the device's time for one expert at n tokens."""

    host_s: Callable[[int], float]
    copy_s: float
    device_s: Callable[[int], float]


class CopyLink(Protocol):
    """What the protocol commands of the link that moves experts into the cache's slots.

    The first four are all a link needs under miss policy ``copy``. ``auto`` also asks the link about its
    queue (``backlog_s``, ``ready_in_s``) and gives it fills (``fill``). Times are seconds from the compute's
    current instant, as far as the link can tell.
    """

    def withdraw(self, slot: int) -> bool:
        """Withdraw the prefetch into ``slot`` if its copy has not started; True if withdrawn."""

    def demand(self, slot: int, key: Key) -> None:
        """Copy ``key`` into ``slot`` ahead of every queued prefetch."""

    def promote(self, slot: int) -> None:
        """The compute needs the prefetch into ``slot`` now: if still queued, it becomes a demand copy."""

    def prefetch(self, slot: int, key: Key) -> None:
        """Queue a copy of ``key`` into ``slot`` behind every demand copy."""

    def backlog_s(self) -> float:
        """Seconds until a demand copy issued now would start (copies running and demand copies queued)."""

    def ready_in_s(self, slot: int) -> float | None:
        """Seconds until the running copy into ``slot`` is done; None while it is still queued."""

    def fill(self, slot: int, key: Key) -> None:
        """Copy ``key`` into ``slot`` in the link's idle time only: paused whenever a demand copy or a
        prefetch wants the link (e.g. copied in chunks between them); a ``promote`` makes it a demand."""


class LayerProtocol:
    """Drives one ``ExpertCache`` and one predictor through the per-layer order above.

    ``predictor`` None (or named ``none``) prefetches nothing; ``record_predictions`` runs the
    predictor anyway (shadow mode) and keeps its output per layer in ``predictions``.
    ``miss_policy`` ``copy`` (default: the protocol as before hybrid execution), ``host`` or ``auto``; the
    latter two need ``host_cost``. ``host_layers``: MoE layers always computed on the host.
    After ``layer``, ``host_seconds`` is the host work the rule counted for the layer (its HOST experts).
    """

    def __init__(self, cache: ExpertCache, link: CopyLink, predictor: Predictor | None = None, *,
                 prefetch_width: int | None = None, record_predictions: bool = False,
                 miss_policy: str = "copy", host_cost: HostCost | None = None,
                 host_layers: frozenset = frozenset()) -> None:
        if miss_policy not in ("copy", "host", "auto"):
            raise MoeError(f"miss policy must be copy, host or auto, not {miss_policy!r}")
        if (miss_policy != "copy" or host_layers) and host_cost is None:
            raise MoeError(f"miss policy {miss_policy} (or host layers) needs the host's costs (a host profile)")
        self.cache, self.link, self.predictor = cache, link, predictor
        self.miss_policy, self.host_cost, self.host_layers = miss_policy, host_cost, frozenset(host_layers)
        self.host_seconds = 0.0
        self.hybrid = miss_policy != "copy" or bool(self.host_layers)  # some experts may go to the host
        self.width = prefetch_width or cache.experts_per_layer
        self.prefetching = predictor is not None and predictor.name != "none"
        self.record_predictions = record_predictions
        self.predicts = self.prefetching or record_predictions  # the predictor runs at every layer
        # the routing history is kept for a predictor that reads it or learns from it
        self.records = self.predicts and (predictor.reads_history or
                                          type(predictor).observe is not Predictor.observe)
        self.history = RoutingHistory(cache.n_moe_layers)
        self._ctx = PredictContext(step=0, layer=0, history=self.history)
        self.predictions: list[list] = [[] for _ in range(cache.n_moe_layers)]
        self.step = 0
        self._token: int | None = None
        self._future: Callable[[int], Sequence[int]] | None = None
        self._step_preds: list | None = None  # this step's predictions, when ranked at begin_step
        self._routing: Sequence | None = None  # the routing they were ranked from
        self.waits: list[int] = []  # reused: the slots the compute must wait for at this layer
        self.in_use: list[list] = []  # [expert, slot, outcome] of the layer being computed

    def begin_step(self, *, token: int | None = None,
                   future: Callable[[int], Sequence[int]] | None = None,
                   routing: Sequence[Sequence[int]] | None = None) -> None:
        """A step (one forward pass) begins; ``token`` is its first token's trace index (recorded
        predictions), ``future(layer)`` its true routing (oracles). ``routing``: every layer's ids, when
        the caller knows them up front and will pass exactly these to ``layer`` (a replay): a predictor
        that can then rank all layers in one pass (``predict_step``), each from its own layer's ids."""
        self.step += 1
        self.cache.begin_step()
        self._token, self._future = token, future
        self._step_preds = (self.predictor.predict_step(routing, self.history)
                            if routing is not None and self.predicts else None)
        self._routing = routing

    def layer(self, layer: int, ids: Sequence[int], hidden: Any = None, ranked: Any = None,
              counts: Sequence[int] | None = None) -> list[int]:
        """Steps 1-6 at ``layer`` for the experts ``ids`` (in access order); returns the slots to wait for.

        ``in_use`` then holds [expert, slot, outcome] per access (HOST: computed on the host, slot -1
        unless a late prefetch's). ``hidden`` is the residual entering the layer's MoE block (router-based
        predictors; None in the simulator); ``ranked`` their rankings when already fetched with the ids
        (``device_ranking``); ``counts`` the tokens routed to each of ``ids`` (None: one each).
        """
        cache, link, waits = self.cache, self.link, self.waits
        waits.clear()
        self.host_seconds = 0.0
        host_rows: list = []
        if layer in self.host_layers:  # never takes a slot: every expert on the host
            cache.host_layer(layer, ids)
            self.in_use = [[e, -1, _HOST] for e in ids]
            hs = self.host_cost.host_s
            self.host_seconds = sum(hs(1 if counts is None else counts[i]) for i in range(len(ids)))
        else:
            outcomes = self.in_use = cache.classify(layer, ids)  # 1. classify, pin the whole set
            for slot in cache.stale_prefetches(layer):  # 2. withdraw stale prefetches not yet started
                if link.withdraw(slot):
                    cache.cancel(slot)
            if self.miss_policy != "copy" and any(o[2] is not _HIT for o in outcomes):
                host_rows = self._decide(layer, outcomes, counts)  # 3. copy or compute on the host
            cache.admit_misses(outcomes)  # 4. misses to copy take slots (a withdrawn one too) ...
            for e, slot, outcome in outcomes:
                if outcome is _HIT or outcome is _HOST:
                    continue
                if outcome is _MISS:
                    link.demand(slot, (layer, e))  # ... and are copied ahead of every queued prefetch
                else:
                    link.promote(slot)  # a late prefetch still queued moves ahead
                waits.append(slot)
        if self.predicts:  # 5. the predictor sees this layer's experts, then predicts l+1..l+D
            if self.records:
                self.history.record(layer, ids)
            if self._step_preds is not None:  # ranked at begin_step from this same routing
                assert ids is self._routing[layer], "layer() must get the routing begin_step was given"
                preds = self._step_preds[layer]
            else:
                ctx = self._ctx  # one context, refilled per layer (host time)
                ctx.step, ctx.layer, ctx.hidden, ctx.token, ctx.future, ctx.ranked = \
                    self.step, layer, hidden, self._token, self._future, ranked
                preds = self.predictor.predict(ctx)
            if self.record_predictions:
                self.predictions[layer] = preds
            if self.prefetching and preds:
                plan = plan_prefetch(preds, layer, self.width)
                if self.host_layers:  # a host layer's experts are never copied
                    plan = [k for k in plan if k[0] not in self.host_layers]
                for key, slot in cache.prefetch(plan, layer):
                    link.prefetch(slot, key)
        if host_rows and self.miss_policy == "auto":
            self._fill(layer, host_rows)  # 6. background copies while the link would sit idle
        return waits

    def _decide(self, layer: int, outcomes: list, counts: Sequence[int] | None) -> list:
        """The cost rule (module docstring): mark the misses (and, in auto, late prefetches) the host
        computes; returns the host-computed misses (fill candidates), in access order."""
        cache, link, hc, auto = self.cache, self.link, self.host_cost, self.miss_policy == "auto"
        link_t = link.backlog_s() if auto else 0.0
        host_t, host_rows = 0.0, []
        for i, row in enumerate(outcomes):
            e, slot, outcome = row
            if outcome is _HIT or (outcome is _LATE and not auto):
                continue
            n = 1 if counts is None else counts[i]
            h = host_t + hc.host_s(n)
            if outcome is _MISS:
                if not auto or h < link_t + hc.copy_s + hc.device_s(n):
                    host_t = h
                    cache.to_host(layer, row)
                    host_rows.append(row)
                else:
                    link_t += hc.copy_s
            else:  # a late prefetch: the rest of its copy, or its promotion when still queued
                left = link.ready_in_s(slot)
                c = (link_t + hc.copy_s if left is None else left) + hc.device_s(n)
                if h < c:
                    host_t = h
                    cache.to_host(layer, row)
                elif left is None:
                    link_t += hc.copy_s
        self.host_seconds = host_t
        return host_rows

    def _fill(self, layer: int, host_rows: list) -> None:
        """Give the link fills of this layer's host-computed misses, in access order, while the cache has
        room for them (``ExpertCache.fill``)."""
        cache, link = self.cache, self.link
        for e, _, _ in host_rows:
            slot = cache.fill((layer, e), layer)
            if slot is None:
                return
            link.fill(slot, (layer, e))

    def end_layer(self) -> None:
        """The layer's compute is done (issued): unpin its experts."""
        self.cache.release_layer()

    def end_step(self) -> None:
        """The step is complete: the predictor learns from its routing (online predictors)."""
        if self.records:
            self.predictor.observe(self.history)
            self.history.end_step()
