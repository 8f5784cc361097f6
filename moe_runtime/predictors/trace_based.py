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
        future, layer = ctx.future, ctx.layer
        return [future(layer + d) for d in self.distances(layer)]  # the true ids, as given (no copy)


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
        _add_ones(self.counts, history.current)
        self._ranked = None


class History(Predictor):
    """score(l+d, e') = P(e' at l+d | experts at l) + recency of e' at l+d + a popularity tie-breaker.

    ``co[l, d-1, e, e']`` counts tokens that chose e at layer l and e' at l+d. Kept
    incrementally, so a prediction is a few array operations over all distances at
    once: ``norm`` holds each row of ``co`` divided by its sum (rows change only when
    ``observe`` counts them; stored negated, like ``popterm``, so that an ascending
    stable argsort ranks), ``popterm`` the tie-breaker per layer, and the recent
    steps' choices as flat indices into a preallocated [L, E] score buffer. Every
    float32 operation is the one the plain formula does, in the same order, so the
    rankings are the same.
    """

    name = "history"
    RECENCY = 0.5  # weight of "a recent step chose e' at l+d"; conditional probabilities sum to ~k

    def __init__(self, opts: PredictorOptions) -> None:
        super().__init__(opts)
        L, D, E = opts.n_moe_layers, opts.lookahead, opts.n_experts
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
        self.norm = -(self.co / (self.co.sum(axis=3, keepdims=True) + 1e-9))  # negated, see predict
        self.popterm = np.empty_like(self.pop)  # negated too
        self._update_popterm()
        self._score = np.zeros((L, E), dtype=np.float32)  # rows l+1..l+D are written by each predict
        self._flat = self._score.reshape(-1)
        self._n = [min(D, L - 1 - l) for l in range(L)]  # distances predicted at layer l
        self._out = [self._score[l + 1:l + 1 + n] for l, n in enumerate(self._n)]  # views, reused
        self._negpop = [self.popterm[l + 1:l + 1 + n] for l, n in enumerate(self._n)]
        self._negnorm = [self.norm[l, :n] for l, n in enumerate(self._n)]
        self._recent_of: dict[int, tuple] = {}  # id(step's routing list) -> (list, flat ids, offsets)
        self._recent_key: tuple = ()
        self._recent: list = []  # per recent step: (flat ids of layer l at flat[offsets[l]:offsets[l+1]])

    def _update_popterm(self) -> None:
        self.popterm[:] = -(1e-6 * self.pop / (self.pop.sum(axis=1, keepdims=True) + 1))

    def predict(self, ctx: PredictContext) -> list[np.ndarray]:
        l = ctx.layer
        n = self._n[l]
        if n <= 0:
            return []
        now = ctx.history.current[l]
        out = self._out[l]  # = -score of layers l+1..l+n: negation is exact, so ascending order is the ranking
        if now is not None and len(now):
            np.add(self._negpop[l], self._negnorm[l].take(now, axis=1).sum(axis=1), out=out)
        else:
            out[...] = self._negpop[l]
        recent = ctx.history.recent
        if recent:  # add.at adds in index order: each score gets the recent steps' terms in their order
            sel = [ids[off[l + 1]:off[l + 1 + n]] for ids, off in self._recent_indices(recent)]
            np.add.at(self._flat, np.concatenate(sel), -np.float32(self.RECENCY / len(recent)))
        ranked = np.argsort(out, axis=1, kind="stable")  # descending score, ties by id (rank_scores)
        return [ranked[i] for i in range(n)]

    def _recent_indices(self, recent) -> list:
        """Per recent step, its chosen experts as flat indices l*E + e into the score buffer, by layer."""
        key = tuple(map(id, recent))
        if key != self._recent_key:
            E, out = self.opts.n_experts, []
            for past in recent:
                hit = self._recent_of.get(id(past))
                if hit is None or hit[0] is not past:
                    parts = [lay * E + np.asarray(x, dtype=np.int64) if x is not None else np.empty(0, np.int64)
                             for lay, x in enumerate(past)]
                    off = np.concatenate([[0], np.cumsum([len(x) for x in parts])])
                    hit = (past, np.concatenate(parts), off.tolist())
                out.append(hit)
            self._recent_of = {id(h[0]): h for h in out}  # holding the lists keeps their ids unique
            self._recent_key, self._recent = key, [(h[1], h[2]) for h in out]
        return self._recent

    def observe(self, history: RoutingHistory) -> None:
        cur = history.current
        L = self.opts.n_moe_layers
        dense = _stack(cur)
        _add_ones(self.pop, cur, dense)
        for d in range(1, min(self.opts.lookahead, L - 1) + 1):
            if dense is not None:  # every layer chose k experts: all layers at once
                a, b = dense[: L - d], dense[d:]
                lay = np.arange(L - d)[:, None]
                self.co[lay[:, :, None], d - 1, a[:, :, None], b[:, None, :]] += 1  # pairs are distinct
                rows = self.co[lay, d - 1, a]  # [L-d, k, E]
                self.norm[lay, d - 1, a] = -(rows / (rows.sum(axis=2, keepdims=True) + 1e-9))
                continue
            for layer in range(L - d):
                if cur[layer] is None or cur[layer + d] is None:
                    continue
                self.co[layer, d - 1][np.ix_(cur[layer], cur[layer + d])] += 1
                rows = self.co[layer, d - 1][cur[layer]]
                self.norm[layer, d - 1][cur[layer]] = -(rows / (rows.sum(axis=1, keepdims=True) + 1e-9))
        self._update_popterm()


def _stack(cur: list) -> np.ndarray | None:
    """The step's routing as one [L, k] array when every layer has k distinct experts, else None."""
    if any(x is None for x in cur) or len({len(x) for x in cur}) != 1:
        return None
    return np.stack(cur)


def _add_ones(counts: np.ndarray, cur: list, dense=False) -> None:
    """counts[l, e] += 1 for each expert e the step chose at layer l (each listed once per layer)."""
    dense = _stack(cur) if dense is False else dense
    if dense is not None:
        counts[np.arange(len(cur))[:, None], dense] += 1
        return
    for layer, ids in enumerate(cur):
        if ids is not None:
            counts[layer, ids] += 1


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
