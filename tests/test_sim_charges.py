"""Host costs from a measured profile (host_layer_us, demand_us, predictor_us) are charged exactly where
the replay says: per layer that waits on copies, and per layer that predicts; 0 by default."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_runtime.core.errors import MoeError
from simulator.cost_model import CostModel
from simulator.device import DeviceSpec, device_from_dict
from simulator.replay import Replay, ReplayOptions, load_inputs

TRACES = Path(__file__).resolve().parent.parent / "traces"
BASE = dict(name="t", nominal=False, h2d_bandwidth_gbps=12.0, h2d_latency_us=10.0, copy_engines=1,
            hbm_bandwidth_gbps=272.0, peak_tflops=30.0, memory_gib=8.0)


def test_wait_and_predictor_charges():
    trace, spec = load_inputs(TRACES / "mixtral-8x7b-humaneval.npz", None, 60)
    plain = CostModel(spec, DeviceSpec(**BASE))
    charged = CostModel(spec, DeviceSpec(**BASE, host_layer_us=30.0, demand_us=20.0,
                                         predictor_us={"history": {1: 40.0, 3: 90.0}}))
    a = Replay(trace, plain, ReplayOptions(budget="30%")).run()
    b = Replay(trace, charged, ReplayOptions(budget="30%")).run()
    assert b["misses"] == a["misses"] and b["compute_s"] == a["compute_s"]
    # without prefetch a layer waits iff it misses; every such layer pays host + hand-off once
    layers_with_misses = b["layers_waited"]
    assert b["total_s"] == pytest.approx(a["total_s"] + layers_with_misses * 50e-6, rel=1e-9)
    h1 = Replay(trace, charged, ReplayOptions(budget="30%", predictor="history", lookahead=2)).run()
    h0 = Replay(trace, plain, ReplayOptions(budget="30%", predictor="history", lookahead=2)).run()
    steps_layers = 60 * trace.n_layers
    assert h1["compute_s"] == pytest.approx(h0["compute_s"] + steps_layers * 40e-6, rel=1e-9)  # lookahead 2 -> 1's
    assert h1["bounds"]["all_resident_s"] == h0["bounds"]["all_resident_s"]  # the bound runs no predictor


def test_predictor_us_is_validated():
    with pytest.raises(MoeError, match="predictor_us"):
        device_from_dict({**BASE, "predictor_us": {"history": {0: 5}}})
    with pytest.raises(MoeError, match="predictor_us"):
        device_from_dict({**BASE, "predictor_us": {"history": {1: -5}}})
    assert DeviceSpec(**BASE).predictor_seconds("history", 2) == 0.0


def test_copy_slowdown_stretches_compute_that_overlaps_copies():
    trace, spec = load_inputs(TRACES / "mixtral-8x7b-humaneval.npz", None, 60)
    plain = CostModel(spec, DeviceSpec(**BASE))
    slowed = CostModel(spec, DeviceSpec(**BASE, copy_slowdown=0.5))
    for predictor in ("none", "oracle"):
        opts = ReplayOptions(budget="30%", predictor=predictor, lookahead=2)
        a, b = Replay(trace, plain, opts).run(), Replay(trace, slowed, opts).run()
        assert a["interference_s"] == 0.0
        assert b["misses"] == a["misses"] and b["compute_s"] == a["compute_s"]
        assert b["total_s"] == pytest.approx(b["compute_s"] + b["stall_s"] + b["interference_s"], rel=1e-9)
        # no compute overlaps a copy without prefetch (demand copies are waited for); prefetches overlap it
        assert (b["interference_s"] > 0) == (predictor == "oracle")
        assert b["interference_s"] <= 0.5 * b["compute_s"] + 1e-12  # at most every layer at half speed
    with pytest.raises(MoeError, match="analytic copies only"):
        Replay(trace, slowed, ReplayOptions(budget="30%"), copies="event")
    with pytest.raises(MoeError, match="copy_slowdown"):
        device_from_dict({**BASE, "copy_slowdown": -0.1})


def test_stretch_is_piecewise_in_the_busy_window():
    from types import SimpleNamespace

    class Busy:  # engines busy until 3.0
        def busy_until(self):
            return 3.0
    r = SimpleNamespace(link=Busy(), slowdown=1.0, interference_s=0.0)
    stretched = lambda c, t: Replay._stretched(r, c, t)  # noqa: E731
    assert stretched(1.0, 0.0) == 2.0  # wholly inside the window: twice as long
    assert stretched(2.0, 0.0) == 3.0 + (2.0 - 1.5)  # 1.5 of work in the 3.0 window, the rest at full speed
    assert stretched(1.0, 3.0) == 1.0  # the engines are idle from t on
    assert r.interference_s == pytest.approx(1.0 + 1.5)


def test_analytic_busy_until_counts_running_and_queued_copies():
    from moe_runtime.core.expert_cache import ExpertCache
    from simulator.copies import AnalyticCopies

    cache = ExpertCache(n_slots=8, n_moe_layers=2, n_experts=4, experts_per_layer=2, expert_bytes=1, policy="lru",
                        scope="global", max_inflight=4)
    link = AnalyticCopies(cache, engines=1, copy_s=2.0)
    link.begin_layer(1.0)
    assert link.busy_until() <= 1.0  # nothing given: idle
    link.demand(0, (0, 0))  # 1.0 .. 3.0
    link.prefetch(1, (1, 0))  # queued behind it: 3.0 .. 5.0
    link.prefetch(2, (1, 1))  # 5.0 .. 7.0
    assert link.busy_until() == 7.0
    two = AnalyticCopies(cache, engines=2, copy_s=2.0)
    two.begin_layer(1.0)
    two.demand(0, (0, 0))
    two.prefetch(1, (1, 0))
    two.prefetch(2, (1, 1))  # engines: 1..3 then 3..5, and 1..3 (after begin_layer starts it)
    assert two.busy_until() == 5.0
