"""The per-layer protocol: everything that is decided at a MoE layer, in one place, for both clocks.

At each MoE layer of a step, in this order (DESIGN.md):

1. classify and pin: every expert of the (step, layer) (a batch's union) is a
   hit, a late prefetch or a miss, and all of them are pinned before any
   eviction;
2. withdraw stale queued prefetches (their layer has passed unused); a
   withdrawn slot is free again, so the misses below can take it;
3. demand copies for misses, ahead of every queued prefetch; a late prefetch
   not yet started is promoted to demand;
4. ask the predictor (which has seen this layer's experts) and admit the
   prefetches the cache allows;
5. the caller waits for the slots returned (this layer's misses and late
   prefetches), computes, then calls ``end_layer`` (unpin).

``LayerProtocol`` makes these decisions; a ``CopyLink`` carries them out. The
executor's link is its copy engine (CUDA streams or a copy thread) and the
simulator's is simpy; neither re-decides anything. This module imports no
torch and reads no clock.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

from moe_runtime.core.expert_cache import ExpertCache, Outcome
from moe_runtime.core.keys import Key
from moe_runtime.core.predictors.base import PredictContext, Predictor, RoutingHistory, plan_prefetch

_HIT, _MISS = Outcome.HIT, Outcome.MISS


class CopyLink(Protocol):
    """What the protocol commands of the link that moves experts into the cache's slots."""

    def withdraw(self, slot: int) -> bool:
        """Withdraw the prefetch into ``slot`` if its copy has not started; True if withdrawn."""

    def demand(self, slot: int, key: Key) -> None:
        """Copy ``key`` into ``slot`` ahead of every queued prefetch."""

    def promote(self, slot: int) -> None:
        """The compute needs the prefetch into ``slot`` now: if still queued, it becomes a demand copy."""

    def prefetch(self, slot: int, key: Key) -> None:
        """Queue a copy of ``key`` into ``slot`` behind every demand copy."""


class LayerProtocol:
    """Drives one ``ExpertCache`` and one predictor through the per-layer order above.

    ``predictor`` None (or named ``none``) prefetches nothing; ``record_predictions`` runs the
    predictor anyway (shadow mode) and keeps its output per layer in ``predictions``.
    """

    def __init__(self, cache: ExpertCache, link: CopyLink, predictor: Predictor | None = None, *,
                 lookahead: int = 1, prefetch_width: int | None = None,
                 record_predictions: bool = False) -> None:
        self.cache, self.link, self.predictor = cache, link, predictor
        self.lookahead = lookahead
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

    def layer(self, layer: int, ids: Sequence[int], hidden: Any = None, ranked: Any = None) -> list[int]:
        """Steps 1-4 at ``layer`` for the experts ``ids`` (in access order); returns the slots to wait for.

        ``in_use`` then holds [expert, slot, outcome] per access. ``hidden`` is the residual
        entering the layer's MoE block (router-based predictors; None in the simulator); ``ranked``
        their rankings when already fetched with the ids (``device_ranking``).
        """
        cache, link, waits = self.cache, self.link, self.waits
        waits.clear()
        outcomes = self.in_use = cache.classify(layer, ids)  # 1. classify, pin the whole set
        for slot in cache.stale_prefetches(layer):  # 2. withdraw stale prefetches not yet started
            if link.withdraw(slot):
                cache.cancel(slot)
        cache.admit_misses(outcomes)  # 3. misses take slots (a withdrawn one too) ...
        for e, slot, outcome in outcomes:
            if outcome is _HIT:
                continue
            if outcome is _MISS:
                link.demand(slot, (layer, e))  # ... and are copied ahead of every queued prefetch
            else:
                link.promote(slot)  # a late prefetch still queued moves ahead
            waits.append(slot)
        if self.predicts:  # 4. the predictor sees this layer's experts, then predicts l+1..l+D
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
                for key, slot in cache.prefetch(plan_prefetch(preds, layer, self.width), layer):
                    link.prefetch(slot, key)
        return waits

    def end_layer(self) -> None:
        """The layer's compute is done (issued): unpin its experts."""
        self.cache.release_layer()

    def end_step(self) -> None:
        """The step is complete: the predictor learns from its routing (online predictors)."""
        if self.records:
            self.predictor.observe(self.history)
            self.history.end_step()
