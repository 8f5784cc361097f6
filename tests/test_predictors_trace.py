"""Trace-only predictors (the ones the simulator can use), on hand-made traces."""

import numpy as np
import pytest

from moe_runtime.core.errors import MoeError
from moe_runtime.predictors import PredictContext, PredictorOptions, RoutingHistory, make_predictor, plan_prefetch
from moe_runtime.traces import TraceMeta, make_trace

META = TraceMeta(model="toy", n_layers=3, n_experts=4, top_k=1, expert_bytes=8, dtype="float32", source="test")


def _trace(rows):
    ids = np.array(rows)[:, :, None]  # [T, L, 1]
    return make_trace(META, ids, np.ones(ids.shape))


def _opts(**kw):
    return PredictorOptions(n_moe_layers=3, n_experts=4, top_k=1, lookahead=2, **kw)


def test_popularity_from_trace_alone():
    trace = _trace([[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]])
    p = make_predictor("popularity", _opts(trace=trace))
    got = p.predict(PredictContext(step=0, layer=0, history=RoutingHistory(3)))
    assert [list(r[:2]) for r in got] == [[1, 2], [3, 2]]  # layer 1: 1 and 2 twice each, tie by id; layer 2: 3 x3


def test_history_uses_cooccurrence_of_this_token():
    # Layer 0 expert e is always followed by expert (e + 1) % 4 at layer 1 and (e + 2) % 4 at layer 2.
    trace = _trace([[e, (e + 1) % 4, (e + 2) % 4] for e in [0, 1, 2, 3, 0, 1, 2, 3]])
    p = make_predictor("history", _opts(trace=trace))
    for e in range(4):
        h = RoutingHistory(3)
        h.record(0, [e])
        got = p.predict(PredictContext(step=0, layer=0, history=h))
        assert got[0][0] == (e + 1) % 4 and got[1][0] == (e + 2) % 4
    h = RoutingHistory(3)
    h.record(1, [2])
    assert len(p.predict(PredictContext(step=0, layer=1, history=h))) == 1  # clipped at the last layer


def test_history_learns_online_from_completed_steps_only():
    p = make_predictor("history", _opts())
    h = RoutingHistory(3)
    for layer, e in enumerate([3, 0, 1]):
        h.record(layer, [e])
    p.observe(h)
    h.end_step()
    h.record(0, [3])
    got = p.predict(PredictContext(step=1, layer=0, history=h))
    assert got[0][0] == 0 and got[1][0] == 1


def test_oracle_and_noisy_oracle():
    future = {1: [2], 2: [3]}
    ctx = PredictContext(step=0, layer=0, history=RoutingHistory(3), future=future.__getitem__)
    assert [list(r) for r in make_predictor("oracle", _opts()).predict(ctx)] == [[2], [3]]
    with pytest.raises(MoeError, match="oracle"):
        make_predictor("oracle", _opts()).predict(PredictContext(step=0, layer=0, history=RoutingHistory(3)))
    # Over many draws, a noisy oracle's recall and precision approach the asked values.
    opts = PredictorOptions(n_moe_layers=2, n_experts=64, top_k=8, lookahead=1, recall=0.75, precision=0.6, seed=1)
    noisy = make_predictor("noisy-oracle", opts)
    true = list(range(8))
    hit = pred = 0
    for _ in range(400):
        got = noisy.predict(PredictContext(step=0, layer=0, history=RoutingHistory(2), future=lambda l: true))[0]
        hit += len(set(got) & set(true))
        pred += len(got)
    assert hit / (400 * 8) == pytest.approx(0.75, abs=0.03)
    assert hit / pred == pytest.approx(0.6, abs=0.04)


def test_recorded_predictions_and_errors():
    preds = np.full((2, 3, 2, 2), -1)
    preds[1, 0, 0] = [3, 1]
    trace = make_trace(META, np.zeros((2, 3, 1)), np.ones((2, 3, 1)), predictions={"gate": preds})
    p = make_predictor("recorded:gate", _opts(trace=trace))
    got = p.predict(PredictContext(step=0, layer=0, history=RoutingHistory(3), token=1))
    assert list(got[0]) == [3, 1] and list(got[1]) == []
    with pytest.raises(MoeError, match="no recorded predictions named 'aligned'"):
        make_predictor("recorded:aligned", _opts(trace=trace))
    with pytest.raises(MoeError, match="unknown predictor 'psychic'"):
        make_predictor("psychic", _opts())
    with pytest.raises(MoeError, match="only in the executor"):
        make_predictor("gate", _opts())


def test_plan_prefetch_orders_nearest_layer_first():
    plan = plan_prefetch([np.array([5, 1, 2]), np.array([7, 0])], layer=3, width=2)
    assert plan == [(4, 5), (4, 1), (5, 7), (5, 0)]
