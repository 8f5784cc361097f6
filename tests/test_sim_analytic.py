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
from types import SimpleNamespace

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


def both(trace, spec, dev, opts, work, idle_s=None):
    """The same replay on the analytic and the event copies (``idle_s``: a start-up on idle engines)."""
    out = []
    for copies in ("analytic", "event"):
        r = Replay(trace, CostModel(spec, dev), opts, workload=work, copies=copies)
        if idle_s is not None:
            r.link_idle_s = idle_s
        out.append(r.run())
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:6])).replace(".npz", ""))
def test_analytic_copies_equal_event_copies(inputs, case):
    name, pred, ev, scope, engines, batch, budget = case
    trace, spec, works = inputs[name]
    dev = DeviceSpec(**{**load_device("rtx-4060-8gb").__dict__, "copy_engines": engines})
    opts = ReplayOptions(budget=budget, eviction=ev, predictor=pred, lookahead=2, scope=scope, batch=batch,
                         max_inflight=4, prefetch_width=6)  # narrow: the cache's prefetch planning is costly
    # a start-up on idle engines in every other case (the storage link's model): the same copies start idle
    a, e = both(trace, spec, dev, opts, works[batch], idle_s=(None if CASES.index(case) % 2 else 0.4e-3))
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


def disk_device(lat_us: float) -> DeviceSpec:
    return DeviceSpec(**{**load_device("rtx-4060-8gb").__dict__, "read_bandwidth_gbps": 1.2,
                         "read_latency_us": lat_us, "read_queue_depth": 4})


@pytest.mark.parametrize("pred,batch", [("none", 1), ("history", 1), ("oracle", 4)])
def test_disk_reads_pay_latency_only_on_an_idle_disk(inputs, pred, batch):
    """Two tiers: a read queued behind another is pipelined with it, so only a read that starts the idle
    disk pays the latency; both copy models agree, and the latency changes the time, not the counts."""
    trace, spec, works = inputs[LAW]
    opts = ReplayOptions(budget="25%", predictor=pred, lookahead=2, batch=batch, expert_source="disk")
    a, e = both(trace, spec, disk_device(3000.0), opts, works[batch])
    assert {k: a[k] for k in COUNTERS} == {k: e[k] for k in COUNTERS}
    assert a["total_s"] == pytest.approx(e["total_s"], rel=1e-9)
    assert a["copy_s"] == pytest.approx(spec.expert_bytes / 1.2e9) and a["copy_idle_s"] == 3e-3
    z, _ = both(trace, spec, disk_device(0.0), opts, works[batch])
    assert {k: z[k] for k in COUNTERS} == {k: a[k] for k in COUNTERS}
    # the latency is paid at most once per read, and fewer times than there are reads
    extra, reads = a["total_s"] - z["total_s"], a["misses"] + a["prefetch_issued"] - a["prefetch_cancelled"]
    assert 0 < extra < reads * 3e-3


def test_demand_reads_on_an_idle_disk_cost_one_latency():
    """A layer's demand reads on the idle disk: one latency, then the reads back to back at the rate; a
    read after the disk went idle pays it again."""
    from simulator.copies import AnalyticCopies

    done = []
    link = AnalyticCopies(SimpleNamespace(n_slots=4, copy_done=done.append), engines=1, copy_s=0.01, idle_s=0.003)
    link.begin_layer(1.0)
    for s in range(3):
        link.demand(s, (0, s))
    end = link.serve([0, 1, 2], 0, 1.0)
    assert end == pytest.approx(1.033)
    link.begin_layer(end)  # a read issued the instant the last one ends follows it
    link.demand(3, (0, 3))
    assert link.serve([3], 0, end) == pytest.approx(1.043) and done == [0, 1, 2]
    link.begin_layer(2.0)
    link.demand(0, (0, 4))
    assert link.serve([0], 1, 2.0) == pytest.approx(2.013) and done == [0, 1, 2, 3]


@pytest.mark.parametrize("fast", [True, False])
def test_event_copies_charge_latency_only_on_an_idle_engine(fast):
    """The reference model pins the same rule: demand copies on idle engines pay it once per engine, copies
    behind them none, a copy after the engines went idle pays it again (with and without the fast path)."""
    import simpy

    from simulator.copies import EventCopies

    env, done = simpy.Environment(), []
    cache = SimpleNamespace(n_slots=8, state=[0] * 8, copy_done=done.append)
    link = EventCopies(env, cache, engines=2, copy_s=0.01, idle_s=0.003, fast=fast)
    ends = []

    def compute():
        for s in range(5):  # engines 0 and 1 take 0, 1 idle (0.013), then 2, 3 and 4 back to back
            link.demand(s, (0, s))
        ends.append((yield from run(link.serve(list(range(5)), 0, 1.0))))
        link.demand(5, (0, 5))
        ends.append((yield from run(link.serve([5], 1, 2.0))))

    def run(gen):
        return (yield from gen) if hasattr(gen, "send") else gen
    env.process(compute())
    env.run()
    assert ends == [pytest.approx(1.033), pytest.approx(2.013)] and sorted(done) == list(range(6))
