"""The simulator against tiny independent references on the bundled real traces (DESIGN.md):
with no prefetch and one copy engine, LRU and Belady miss counts equal a plain implementation of
the same access order (every expert of the current (token, layer) pinned from the start, as DESIGN says), and
total = compute + misses x (expert bytes / bandwidth + latency)."""

from collections import OrderedDict
from pathlib import Path

import pytest

from simulator.bounds import belady_misses
from simulator.cost_model import CostModel
from simulator.device import DeviceSpec
from simulator.replay import Replay, ReplayOptions, build_workload, load_inputs

TRACES = Path(__file__).resolve().parent.parent / "traces"
ONE_ENGINE = DeviceSpec(name="test-pcie", nominal=True, h2d_bandwidth_gbps=16.0, h2d_latency_us=12.0,
                        copy_engines=1, hbm_bandwidth_gbps=300.0, peak_tflops=50.0, memory_gib=8.0)


def ref_lru(steps, capacity):
    cache, misses = OrderedDict(), 0
    for step in steps:
        for layer, ids in enumerate(step):
            pinned = {(layer, e) for e in ids}  # the whole set, not only the experts looked at so far
            for e in ids:
                key = (layer, e)
                if key in cache:
                    cache.move_to_end(key)
                else:
                    misses += 1
                    if len(cache) >= capacity:
                        del cache[next(k for k in cache if k not in pinned)]
                    cache[key] = None
    return misses


def ref_belady(steps, capacity):
    seq = [(layer, e) for step in steps for layer, ids in enumerate(step) for e in ids]
    nxt, seen = [0] * len(seq), {}
    for i in range(len(seq) - 1, -1, -1):
        nxt[i], seen[seq[i]] = seen.get(seq[i], float("inf")), i
    cache, misses, i = {}, 0, 0  # key -> next use
    for step in steps:
        for layer, ids in enumerate(step):
            pinned = {(layer, e) for e in ids}
            for e in ids:
                key = (layer, e)
                if key not in cache:
                    misses += 1
                    if len(cache) >= capacity:
                        del cache[max((k for k in cache if k not in pinned), key=cache.__getitem__)]
                cache[key] = nxt[i]
                i += 1
    return misses


def _setup(name, tokens):
    trace, spec = load_inputs(TRACES / name, None, tokens)
    return trace, CostModel(spec, ONE_ENGINE)


@pytest.mark.parametrize("name,tokens,budgets", [
    ("deepseek-v2-lite-law.npz", 800, ["6", "10%", "25%", "60%"]),
    ("mixtral-8x7b-humaneval.npz", 333, ["2", "25%", "50%", "90%"]),
])
def test_lru_matches_reference_and_closed_form(name, tokens, budgets):
    trace, cost = _setup(name, tokens)
    steps = trace.expert_ids.tolist()
    copy_s = cost.spec.expert_bytes / 16e9 + 12e-6
    for b in budgets:
        rep = Replay(trace, cost, ReplayOptions(budget=b, eviction="lru", predictor="none")).run()
        assert rep["misses"] == ref_lru(steps, rep["n_slots"]), b
        assert rep["misses"] > 0 and rep["hits"] + rep["misses"] == rep["accesses"] == trace.expert_ids.size
        assert rep["total_s"] == pytest.approx(rep["compute_s"] + rep["misses"] * copy_s, rel=1e-9)


@pytest.mark.parametrize("name,tokens,budgets", [
    ("deepseek-v2-lite-law.npz", 250, ["10%", "40%"]),
    ("mixtral-8x7b-humaneval.npz", 200, ["3", "50%"]),
])
def test_belady_matches_reference_and_closed_form(name, tokens, budgets):
    trace, cost = _setup(name, tokens)
    steps = trace.expert_ids.tolist()
    copy_s = cost.spec.expert_bytes / 16e9 + 12e-6
    for b in budgets:
        rep = Replay(trace, cost, ReplayOptions(budget=b, eviction="belady", predictor="none")).run()
        ref = ref_belady(steps, rep["n_slots"])
        assert rep["misses"] == ref == rep["bounds"]["belady_misses"], b
        assert rep["total_s"] == pytest.approx(rep["compute_s"] + rep["misses"] * copy_s, rel=1e-9)


def test_heap_belady_matches_reference_per_layer_scope():
    trace, _ = _setup("mixtral-8x7b-humaneval.npz", 300)
    steps = trace.expert_ids.tolist()
    L = trace.n_layers
    for per_layer in (2, 3, 5):
        want = sum(ref_belady([[s[l]] for s in steps], per_layer) for l in range(L))
        assert belady_misses(steps, per_layer * L, "per-layer", L) == want


def test_event_path_equals_shortcut_for_demand_copies():
    """The idle-engine shortcut for demand copies gives exactly what simpy's engines give."""
    trace, cost = _setup("deepseek-v2-lite-law.npz", 200)
    for dev_engines in (1, 3):
        dev = DeviceSpec(**{**ONE_ENGINE.__dict__, "copy_engines": dev_engines})
        c = CostModel(cost.spec, dev)
        w = build_workload(trace, 1)
        a = Replay(trace, c, ReplayOptions(budget="20%"), workload=w, fast=True).run()
        b = Replay(trace, c, ReplayOptions(budget="20%"), workload=w, fast=False).run()
        assert a["misses"] == b["misses"]
        assert a["total_s"] == pytest.approx(b["total_s"], rel=1e-12)
        assert a["stall_s"] == pytest.approx(b["stall_s"], rel=1e-9)


def test_per_layer_scope_is_one_reference_lru_per_layer():
    trace, cost = _setup("mixtral-8x7b-humaneval.npz", 333)
    steps = trace.expert_ids.tolist()
    L = trace.n_layers
    rep = Replay(trace, cost, ReplayOptions(budget=str(5 * L), scope="per-layer")).run()
    assert rep["misses"] == sum(ref_lru([[s[l]] for s in steps], 5) for l in range(L))
    assert rep["per_layer"]["misses"] == [ref_lru([[s[l]] for s in steps], 5) for l in range(L)]
