"""Predictors that need no hidden states, so the simulator can use them too.

- ``none``: predicts nothing (on-demand loading).
- ``oracle``: the step's true routing (needs forced routing or a replayed trace).
- ``noisy-oracle``: the truth degraded to a chosen recall and precision, to ask
  how good a predictor must be.
- ``popularity``: per-layer frequency, from a trace prior and/or online counts.
- ``history`` (in ``history.py``): co-occurrence counts; ranks layer l+d's experts from the experts
  this step chose at layer l, plus what recent steps chose at l+d.
- ``recorded``: predictions a trace recorded for a named predictor.
Online predictors learn only from steps already completed (``observe``), so a
replay never sees the future through them.
"""

from __future__ import annotations

import numpy as np

from moe_runtime.core.errors import MoeError
from moe_runtime.core.predictors.base import PredictContext, Predictor, PredictorOptions, RoutingHistory, count_routing


class NonePredictor(Predictor):
    name = "none"

    def predict(self, ctx: PredictContext) -> list[np.ndarray]:
        return []


class Oracle(Predictor):
    name = "oracle"
    needs_future = True

    def predict(self, ctx: PredictContext) -> list[np.ndarray]:
        if ctx.future is None:
            raise MoeError("predictor 'oracle' needs the true routing: route from a trace")
        future, layer = ctx.future, ctx.layer
        return [future(layer + d) for d in self.distances(layer)]  # the true ids, as given (no copy)

    def predict_step(self, routing, history: RoutingHistory) -> list[list]:
        """A replayed step: layer l's predictions are routing[l+1..l+D], as ``predict`` gives them."""
        return [[routing[l + d] for d in dists] for l, dists in enumerate(self._distances)]


class NoisyOracle(Predictor):
    """Keeps each true expert with probability ``recall``; adds wrong ones so that precision ~ ``precision``."""

    name = "noisy-oracle"
    needs_future = True

    def __init__(self, opts: PredictorOptions) -> None:
        super().__init__(opts)
        if not (0 <= opts.recall <= 1 and 0 < opts.precision <= 1):
            raise MoeError("noisy-oracle needs 0 <= recall <= 1 and 0 < precision <= 1")
        self.rng = np.random.default_rng(opts.seed)

    def predict(self, ctx: PredictContext) -> list[np.ndarray]:
        if ctx.future is None:
            raise MoeError("predictor 'noisy-oracle' needs the true routing: route from a trace")
        out, E = [], self.opts.n_experts
        for d in self.distances(ctx.layer):
            true = np.asarray(ctx.future(ctx.layer + d))
            kept = true[self.rng.random(len(true)) < self.opts.recall]
            n_wrong = int(round(max(len(kept), 1) * (1 - self.opts.precision) / self.opts.precision))
            others = np.setdiff1d(np.arange(E), true)
            wrong = self.rng.choice(others, size=min(n_wrong, len(others)), replace=False)
            pred = np.concatenate([kept, wrong])
            out.append(pred[self.rng.permutation(len(pred))])
        return out


class Popularity(Predictor):
    """Ranks layer l+d's experts by count (trace prior plus online counts), ties by id.

    The ranking of every layer is kept sorted and recomputed only after ``observe``
    changed the counts, so a prediction is a lookup.
    """

    name = "popularity"
    reads_history = True

    def __init__(self, opts: PredictorOptions) -> None:
        super().__init__(opts)
        self.counts = np.zeros((opts.n_moe_layers, opts.n_experts), dtype=np.float64)
        if opts.trace is not None:
            ids = opts.trace.expert_ids.astype(np.int64)  # [T, L, K]
            for layer in range(opts.n_moe_layers):
                self.counts[layer] += np.bincount(ids[:, layer].ravel(), minlength=opts.n_experts)
        self._ranked: list | None = None  # per layer, its experts best first; None: counts changed

    def predict(self, ctx: PredictContext) -> list[np.ndarray]:
        if self._ranked is None:  # stable argsort of -count: descending count, ties by id (rank_scores)
            self._ranked = list(np.argsort(-self.counts, axis=1, kind="stable"))
        return [self._ranked[ctx.layer + d] for d in self.distances(ctx.layer)]

    def observe(self, history: RoutingHistory) -> None:
        count_routing(self.counts, history.current)
        self._ranked = None


class Recorded(Predictor):
    """Replays predictions a trace recorded (``trace.predictions[name]``, [T, L, D, P], -1 padded)."""

    name = "recorded"

    def __init__(self, opts: PredictorOptions) -> None:
        super().__init__(opts)
        trace, name = opts.trace, opts.recorded
        if trace is None or name not in getattr(trace, "predictions", {}):
            have = ", ".join(sorted(getattr(trace, "predictions", {}) or [])) or "none"
            raise MoeError(f"the trace has no recorded predictions named {name!r} (it has: {have})")
        self.table = trace.predictions[name]
        recorded = int(self.table.shape[2])
        if opts.lookahead > recorded:  # rows beyond it do not exist: the run would be labelled D, run at less
            raise MoeError(f"--predictor recorded:{name} was recorded at lookahead {recorded}; run it with "
                           f"--lookahead {recorded} or less, not --lookahead {opts.lookahead}")

    def predict(self, ctx: PredictContext) -> list[np.ndarray]:
        rows = self.table[ctx.token, ctx.layer]  # [D, P]
        return [r[r >= 0].astype(np.int64) for r in rows[: len(self.distances(ctx.layer))]]
