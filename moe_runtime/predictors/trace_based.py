"""Predictors that need no hidden states, so the simulator can use them too.

- ``none``: predicts nothing (on-demand loading).
- ``oracle``: the step's true routing (needs forced routing or a replayed trace).
- ``noisy-oracle``: the truth degraded to a chosen recall and precision, to ask
  how good a predictor must be.
- ``popularity``: per-layer frequency, from a trace prior and/or online counts.
- ``history``: co-occurrence counts; ranks layer l+d's experts from the experts
  this step chose at layer l, plus what recent steps chose at l+d.
- ``recorded``: predictions a trace recorded for a named predictor.
Online predictors learn only from steps already completed (``observe``), so a
replay never sees the future through them.
"""

from __future__ import annotations

import numpy as np

from moe_runtime.errors import MoeError
from moe_runtime.predictors.base import PredictContext, Predictor, PredictorOptions, RoutingHistory, rank_scores


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
        return [np.asarray(ctx.future(ctx.layer + d)) for d in self.distances(ctx.layer)]


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
    name = "popularity"

    def __init__(self, opts: PredictorOptions) -> None:
        super().__init__(opts)
        self.counts = np.zeros((opts.n_layers, opts.n_experts), dtype=np.float64)
        if opts.trace is not None:
            ids = opts.trace.expert_ids.astype(np.int64)  # [T, L, K]
            for layer in range(opts.n_layers):
                self.counts[layer] += np.bincount(ids[:, layer].ravel(), minlength=opts.n_experts)

    def predict(self, ctx: PredictContext) -> list[np.ndarray]:
        return [rank_scores(self.counts[ctx.layer + d]) for d in self.distances(ctx.layer)]

    def observe(self, history: RoutingHistory) -> None:
        for layer, ids in enumerate(history.current):
            if ids is not None:
                self.counts[layer, ids] += 1


class History(Predictor):
    """score(l+d, e') = P(e' at l+d | experts at l) + recency of e' at l+d + a popularity tie-breaker.

    ``co[l, d-1, e, e']`` counts tokens that chose e at layer l and e' at l+d.
    """

    name = "history"
    RECENCY = 0.5  # weight of "a recent step chose e' at l+d"; conditional probabilities sum to ~k

    def __init__(self, opts: PredictorOptions) -> None:
        super().__init__(opts)
        L, D, E = opts.n_layers, opts.lookahead, opts.n_experts
        self.co = np.zeros((L, D, E, E), dtype=np.float32)
        self.pop = np.zeros((L, E), dtype=np.float32)
        if opts.trace is not None:
            ids = opts.trace.expert_ids.astype(np.int64)  # [T, L, K]
            for layer in range(L):
                self.pop[layer] += np.bincount(ids[:, layer].ravel(), minlength=E)
                for d in range(1, min(D, L - 1 - layer) + 1):
                    for a in range(ids.shape[2]):  # every (rank at l, rank at l+d) pair of each token
                        for b in range(ids.shape[2]):
                            np.add.at(self.co[layer, d - 1], (ids[:, layer, a], ids[:, layer + d, b]), 1)

    def predict(self, ctx: PredictContext) -> list[np.ndarray]:
        l = ctx.layer
        now = ctx.history.current[l]
        out = []
        for d in self.distances(l):
            rows = self.co[l, d - 1]
            score = 1e-6 * self.pop[l + d] / (self.pop[l + d].sum() + 1)
            if now is not None and len(now):
                sel = rows[now]  # [k, E]
                score = score + (sel / (sel.sum(axis=1, keepdims=True) + 1e-9)).sum(axis=0)
            for past in ctx.history.recent:
                if past[l + d] is not None:
                    score[past[l + d]] += self.RECENCY / len(ctx.history.recent)
            out.append(rank_scores(score))
        return out

    def observe(self, history: RoutingHistory) -> None:
        cur = history.current
        for layer in range(self.opts.n_layers):
            if cur[layer] is None:
                continue
            self.pop[layer, cur[layer]] += 1
            for d in range(1, min(self.opts.lookahead, self.opts.n_layers - 1 - layer) + 1):
                if cur[layer + d] is not None:
                    self.co[layer, d - 1][np.ix_(cur[layer], cur[layer + d])] += 1


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

    def predict(self, ctx: PredictContext) -> list[np.ndarray]:
        rows = self.table[ctx.token, ctx.layer]  # [D, P]
        return [r[r >= 0].astype(np.int64) for r in rows[: len(self.distances(ctx.layer))]]
