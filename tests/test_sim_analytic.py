"""The analytic copy engines equal the simpy process-per-copy engines exactly.

On 300-token slices of the bundled real traces, for every trace-only predictor,
every eviction policy, both scopes, one and two copy engines and batch 1 and 4
(a covering set of combinations, so each value meets the others it interacts
with: two engines with every prefetching predictor, per-layer scope with
batching), the two copy models give equal counters and the same times (1e-9
relative; in fact the same floats, see copies.py). The full product was
checked once by hand on all three traces (README, Simulator).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from simulator.cost_model import CostModel
from simulator.device import DeviceSpec, load_device
from simulator.replay import Replay, ReplayOptions, build_workload, load_inputs

TRACES = Path(__file__).resolve().parent.parent / "traces"
COUNTERS = ("accesses", "hits", "late", "misses", "evictions", "prefetch_issued", "prefetch_used",
            "prefetch_wasted", "prefetch_cancelled", "bytes_h2d")
MIX, LAW, SUM = "mixtral-8x7b-humaneval.npz", "deepseek-v2-lite-law.npz", "deepseek-v2-lite-summary.npz"
CASES = [  # trace, predictor, eviction, scope, engines, batch, budget
    (MIX, "none", "lru", "global", 1, 1, "30%"),
    (MIX, "history", "lfu", "per-layer", 2, 1, "75%"),
    (MIX, "popularity", "fifo", "global", 2, 4, "30%"),
    (MIX, "oracle", "belady", "global", 2, 1, "30%"),
    (MIX, "oracle", "static", "per-layer", 1, 1, "75%"),
    (LAW, "history", "lru", "global", 2, 1, "25%"),
    (LAW, "noisy-oracle", "fifo", "per-layer", 2, 1, "30%"),
    (SUM, "oracle", "belady", "per-layer", 1, 4, "60%"),
    (SUM, "popularity", "static", "global", 2, 1, "20%"),
    (SUM, "none", "layer-cyclic", "per-layer", 2, 4, "50%"),
]


@pytest.fixture(scope="module")
def inputs():
    out = {}
    for name in (MIX, LAW, SUM):
        trace, spec = load_inputs(TRACES / name, None, 300)
        out[name] = trace, spec, {b: build_workload(trace, b) for b in (1, 4)}
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:6])).replace(".npz", ""))
def test_analytic_copies_equal_event_copies(inputs, case):
    name, pred, ev, scope, engines, batch, budget = case
    trace, spec, works = inputs[name]
    dev = DeviceSpec(**{**load_device("rtx-4060-8gb").__dict__, "copy_engines": engines})
    opts = ReplayOptions(budget=budget, eviction=ev, predictor=pred, lookahead=2, scope=scope, batch=batch,
                         max_inflight=4, prefetch_width=6)  # narrow: the cache's prefetch planning is costly
    a = Replay(trace, CostModel(spec, dev), opts, workload=works[batch], copies="analytic").run()
    e = Replay(trace, CostModel(spec, dev), opts, workload=works[batch], copies="event").run()
    assert {k: a[k] for k in COUNTERS} == {k: e[k] for k in COUNTERS}
    assert a["per_layer"]["late"] == e["per_layer"]["late"]
    for k in ("total_s", "stall_s"):
        assert a[k] == pytest.approx(e[k], rel=1e-9, abs=1e-12)
    assert a["phase_s"]["decode"] == pytest.approx(e["phase_s"]["decode"], rel=1e-9, abs=1e-12)
    assert a["phase_s"]["decode_stall"] == pytest.approx(e["phase_s"]["decode_stall"], rel=1e-9, abs=1e-12)
    assert 0 <= a["phase_s"]["decode_stall"] <= a["stall_s"] * (1 + 1e-12)
    assert a["per_layer"]["stall_s"] == pytest.approx(e["per_layer"]["stall_s"], rel=1e-9, abs=1e-12)
    if pred != "none":  # the cases exercise the queue: prefetches that arrive late
        assert a["late"] > 0 and a["prefetch_issued"] > 0
