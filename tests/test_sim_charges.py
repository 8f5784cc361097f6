"""Host costs from a measured profile (host_layer_us, demand_us, predictor_us) are charged exactly where
the replay says: per layer that waits on copies, and per layer that predicts; 0 by default."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_runtime.errors import MoeError
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
