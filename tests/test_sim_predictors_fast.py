"""The fast ``history`` and ``popularity`` predictors rank exactly as the plain ones did.

``OldPopularity`` and ``OldHistory`` below are verbatim copies of the implementations
before they kept their counts incrementally (a fresh numpy pipeline per call);
both are driven through the same steps of real traces (batch 1 and batch 4, so
both the all-layers-at-once and the per-layer paths of ``observe`` run, with and
without a trace prior) and must return identical rankings at every layer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moe_runtime.predictors import PredictContext, PredictorOptions, RoutingHistory, make_predictor
from moe_runtime.core.predictors.base import Predictor, rank_scores
from simulator.workload import build_workload, load_inputs

TRACES = Path(__file__).resolve().parent.parent / "traces"


# --- verbatim: moe_runtime/predictors/trace_based.py before the incremental version ---------
class OldPopularity(Predictor):

    def __init__(self, opts: PredictorOptions) -> None:
        super().__init__(opts)
        self.counts = np.zeros((opts.n_moe_layers, opts.n_experts), dtype=np.float64)
        if opts.trace is not None:
            ids = opts.trace.expert_ids.astype(np.int64)  # [T, L, K]
            for layer in range(opts.n_moe_layers):
                self.counts[layer] += np.bincount(ids[:, layer].ravel(), minlength=opts.n_experts)

    def predict(self, ctx: PredictContext) -> list[np.ndarray]:
        return [rank_scores(self.counts[ctx.layer + d]) for d in self.distances(ctx.layer)]

    def observe(self, history: RoutingHistory) -> None:
        for layer, ids in enumerate(history.current):
            if ids is not None:
                self.counts[layer, ids] += 1


class OldHistory(Predictor):
    """score(l+d, e') = P(e' at l+d | experts at l) + recency of e' at l+d + a popularity tie-breaker.

    ``co[l, d-1, e, e']`` counts tokens that chose e at layer l and e' at l+d.
    """

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
        for layer in range(self.opts.n_moe_layers):
            if cur[layer] is None:
                continue
            self.pop[layer, cur[layer]] += 1
            for d in range(1, min(self.opts.lookahead, self.opts.n_moe_layers - 1 - layer) + 1):
                if cur[layer + d] is not None:
                    self.co[layer, d - 1][np.ix_(cur[layer], cur[layer + d])] += 1


# ---------------------------------------------------------------------------------------------


def _drive(new, old, steps, n_layers):
    """Feed both predictors the same steps as the protocol does; compare every prediction, and the
    fast one's whole-step ranking (``predict_step``, what a replay asks) with its per-layer one."""
    h_new, h_old = RoutingHistory(n_layers), RoutingHistory(n_layers)
    n = 0
    for s, step in enumerate(steps, start=1):
        whole = new.predict_step(step, h_new)
        if whole is not None:
            n += 1
        for layer, ids in enumerate(step):
            if whole is not None:
                assert len(whole[layer]) == len(new.distances(layer))
            for h in (h_new, h_old):
                h.record(layer, ids)
            a = new.predict(PredictContext(step=s, layer=layer, history=h_new))
            b = old.predict(PredictContext(step=s, layer=layer, history=h_old))
            assert len(a) == len(b)
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)
                n += 1
            if whole is not None:
                for x, y in zip(whole[layer], a):
                    np.testing.assert_array_equal(x, y)
        new.observe(h_new)
        old.observe(h_old)
        h_new.end_step()
        h_old.end_step()
    return n


@pytest.mark.parametrize("trace_name,tokens,batch,lookahead,prior", [
    ("deepseek-v2-lite-law.npz", 120, 1, 2, False),
    ("deepseek-v2-lite-summary.npz", 160, 4, 3, True),
    ("mixtral-8x7b-humaneval.npz", 200, 1, 1, True),
    ("mixtral-8x7b-humaneval.npz", 200, 4, 4, False),
])
def test_fast_predictors_rank_as_the_plain_ones(trace_name, tokens, batch, lookahead, prior):
    trace, _ = load_inputs(TRACES / trace_name, None, tokens)
    steps = build_workload(trace, batch).ids
    opts = PredictorOptions(n_moe_layers=trace.n_layers, n_experts=trace.n_experts, top_k=trace.top_k,
                            lookahead=lookahead, trace=trace.slice(0, tokens // 2) if prior else None)
    for name, old_cls in (("history", OldHistory), ("popularity", OldPopularity)):
        new = make_predictor(name, opts)
        n = _drive(new, old_cls(opts), steps, trace.n_layers)
        assert n >= len(steps) * (trace.n_layers - lookahead)  # every layer with a layer after it
        if name == "history" and batch == 1:  # every step ranked whole too (a batch's unions differ)
            assert new.predict_step(steps[0], RoutingHistory(trace.n_layers)) is not None


@pytest.mark.parametrize("name", ["history", "oracle"])
def test_a_replayed_step_ranked_at_once_prefetches_as_layer_by_layer(name):
    """The replay hands the protocol each step's routing (``predict_step``); the cache then does exactly
    what it does when the predictor ranks layer by layer, as the executor asks."""
    from moe_runtime.core.expert_cache import ExpertCache
    from moe_runtime.core.protocol import LayerProtocol
    from simulator.copies import LockstepCopies

    trace, _ = load_inputs(TRACES / "deepseek-v2-lite-law.npz", None, 300)
    steps = build_workload(trace, 1).ids
    L, E, K = trace.n_layers, trace.n_experts, trace.top_k
    runs = []
    for whole in (False, True):
        cache = ExpertCache(n_slots=L * E // 4, n_moe_layers=L, n_experts=E, experts_per_layer=K, expert_bytes=1,
                            policy="lru", scope="global", max_inflight=8)
        pred = make_predictor(name, PredictorOptions(n_moe_layers=L, n_experts=E, top_k=K, lookahead=2))
        link = LockstepCopies(cache, per_layer=2)  # two prefetches land per layer: some arrive, some go stale
        proto = LayerProtocol(cache, link, pred, record_predictions=True)
        predictions = []
        for step in steps:
            proto.begin_step(future=step.__getitem__, routing=step if whole else None)
            for layer, ids in enumerate(step):
                link.begin_layer()
                list(link.serve(proto.layer(layer, ids), layer, 0.0))  # the misses and late prefetches land
                predictions.append([list(p) for p in proto.predictions[layer]])
                proto.end_layer()
            proto.end_step()
        runs.append((vars(cache.finish()), predictions))
    assert runs[0][0]["prefetch_issued"] > 1000
    assert runs[0] == runs[1]
