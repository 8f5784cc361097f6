"""The ``history`` predictor: co-occurrence counts, kept incrementally.

score(l+d, e') = P(e' at l+d | the experts this step chose at l) + recency of e' at l+d + a popularity
tie-breaker. ``co[l, d-1, e, e']`` counts tokens that chose e at layer l and e' at l+d; the conditional
probability of a row is the row over its sum, computed when a prediction gathers it (``rowsum`` is
kept with the counts: sums of integer counts are exact in float32 below 2^24, so they equal a fresh
sum). Scores are held negated, so that an ascending stable argsort ranks (descending score, ties by id);
negation is exact.

Every float32 operation is the one the plain formula does, in the same order, so the rankings are the
plain formula's (``tests/test_sim_predictors_fast.py`` keeps that formula as the reference):
- ``predict`` ranks one layer's distances as the executor asks, layer by layer;
- ``predict_step`` ranks every layer of a step whose routing is known up front (a replay) in one pass,
  each layer from its own ids.
"""

from __future__ import annotations

import numpy as np

from moe_runtime.core.predictors.base import (PredictContext, Predictor, PredictorOptions, RoutingHistory, count_routing,
                                         dense_routing)


class History(Predictor):
    """See the module docstring."""

    name = "history"
    reads_history = True
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
        self.rowsum = self.co.sum(axis=3)  # [L, D, E]
        self._co_flat, self._co_rows = self.co.reshape(-1), self.co.reshape(-1, E)  # views
        self._rowsum_flat = self.rowsum.reshape(-1)
        # the tie-breaker of layer t (negated), with D zero rows past the last layer (targets that do not exist)
        self._negpop = np.zeros((L + D, E), dtype=np.float32)
        self._update_popterm()
        self._n = [len(self.distances(l)) for l in range(L)]  # distances predicted at layer l
        lay = np.arange(L)[:, None]
        self._first_row = ((lay * D + np.arange(D)) * E)[:, :, None]  # [L, D, 1]: row (l, d-1, 0) of co
        self._target = lay + np.arange(1, D + 1)  # [L, D]: layer l+d
        # the (l, d) pairs with l + d a layer, layer-major: source layer, target layer, row (l, d-1, 0)
        pairs = [(l, d) for l in range(L) for d in self.distances(l)]
        self._pair_src = np.array([l for l, _ in pairs], dtype=np.int64)
        self._pair_tgt = np.array([l + d for l, d in pairs], dtype=np.int64)
        self._pair_row = np.array([(l * D + d - 1) * E for l, d in pairs], dtype=np.int64)[:, None]
        self._pairs_before = np.concatenate([[0], np.cumsum(self._n)]).tolist()  # pairs of layers < l
        self._buf = np.zeros((D, E), dtype=np.float32)  # predict's scores, reused
        self._recency_of: dict[int, tuple] = {}  # id(a step's routing list) -> (the list, index, offsets)

    def _update_popterm(self) -> None:
        L = len(self.pop)
        self._negpop[:L] = -(1e-6 * self.pop / (self.pop.sum(axis=1, keepdims=True) + 1))

    def _neg_probs(self, rows: np.ndarray) -> np.ndarray:
        """-(co row / (its sum + 1e-9)) for flat row numbers ``rows`` [...] -> [..., E]."""
        p = self._co_rows.take(rows, axis=0)
        np.divide(p, (self._rowsum_flat.take(rows) + 1e-9)[..., None], out=p)
        return np.negative(p, out=p)

    # -- predicting ----------------------------------------------------------------------
    def predict(self, ctx: PredictContext) -> list[np.ndarray]:
        l = ctx.layer
        n = self._n[l]
        if n <= 0:
            return []
        now = ctx.history.current[l]
        out = self._buf[:n]  # rows d-1 = -score of layer l+d
        if now is not None and len(now):
            rows = self._first_row[l, :n] + np.asarray(now, dtype=np.int64)  # [n, k]
            np.add(self._negpop[l + 1:l + 1 + n], self._neg_probs(rows).sum(axis=1), out=out)
        else:
            out[...] = self._negpop[l + 1:l + 1 + n]
        recent = ctx.history.recent
        if recent:  # add.at adds in index order: each score gets the recent steps' terms in their order
            base = l * self.opts.lookahead * self.opts.n_experts
            sel = [idx[off[l]:off[l + 1]] for idx, off in map(self._recency, recent)]
            np.add.at(out.reshape(-1), np.concatenate(sel) - base, -np.float32(self.RECENCY / len(recent)))
        ranked = np.argsort(out, axis=1, kind="stable")  # descending score, ties by id (rank_scores)
        return [ranked[i] for i in range(n)]

    def predict_step(self, routing, history: RoutingHistory) -> list[list] | None:
        """``predict`` at every layer in one pass: layer l's rows use ``routing[l]``, the counts and the
        recent steps. None unless every layer chose the same number of experts (a batch's unions differ)."""
        now = dense_routing(routing)
        if now is None or len(routing) != self.opts.n_moe_layers or not now.shape[1]:
            return None
        # -P(. | now[l]) summed over the k experts -> [L, D, E], plus the tie-breaker of layer l+d
        out = self._negpop.take(self._target, axis=0) + self._neg_probs(self._first_row + now[:, None, :]).sum(axis=2)
        recent = history.recent
        if recent:  # each recent step's choices at l+d, added to row (l, d) in the recent steps' order
            idx = np.concatenate([self._recency(past)[0] for past in recent])
            np.add.at(out.reshape(-1), idx, -np.float32(self.RECENCY / len(recent)))
        ranked = np.argsort(out, axis=2, kind="stable").tolist()  # [L, D, E]: one conversion per step
        return [rows[:n] for rows, n in zip(ranked, self._n)]

    def _recency(self, past) -> tuple[np.ndarray, list[int]]:
        """A past step's choices as flat indices (l*D + d-1)*E + e' (e' chosen at l+d) into [L, D, E]
        scores, layer-major, and where each source layer's run starts (``observe`` makes them for a step
        whose layers all chose k experts; others are made here, once)."""
        hit = self._recency_of.get(id(past))
        if hit is not None and hit[0] is past:
            return hit[1], hit[2]
        D, E = self.opts.lookahead, self.opts.n_experts
        parts, off = [], [0]
        for l, n in enumerate(self._n):
            run = [(l * D + d - 1) * E + np.asarray(past[l + d], dtype=np.int64)
                   for d in range(1, n + 1) if past[l + d] is not None]
            parts += run
            off.append(off[-1] + sum(len(r) for r in run))
        idx = np.concatenate(parts) if parts else np.empty(0, np.int64)
        self._recency_of[id(past)] = (past, idx, off)  # holding the list keeps its id unique
        return idx, off

    # -- learning ------------------------------------------------------------------------
    def observe(self, history: RoutingHistory) -> None:
        cur = history.current
        dense = dense_routing(cur)
        count_routing(self.pop, cur, dense)
        keep = {id(x) for x in history.recent}  # recency indices of the steps still in the window
        self._recency_of = {k: v for k, v in self._recency_of.items() if k in keep}
        if dense is not None:  # every layer chose k experts: all layers and distances at once
            k = dense.shape[1]
            src, tgt = dense.take(self._pair_src, axis=0), dense.take(self._pair_tgt, axis=0)  # [P, k] each
            rows = self._pair_row + src  # [P, k]: rows (l, d-1, e), distinct
            self._co_flat[(rows[:, :, None] * self.opts.n_experts + tgt[:, None, :]).ravel()] += 1
            self._rowsum_flat[rows.ravel()] += k  # each row gained k counts (exact: integers)
            self._recency_of[id(cur)] = (cur, (self._pair_row + tgt).ravel(), [k * n for n in self._pairs_before])
        else:
            for l, n in enumerate(self._n):
                for d in range(1, n + 1):
                    a, b = cur[l], cur[l + d]
                    if a is None or b is None:
                        continue
                    self.co[l, d - 1][np.ix_(a, b)] += 1
                    self.rowsum[l, d - 1][a] += len(b)
        self._update_popterm()

