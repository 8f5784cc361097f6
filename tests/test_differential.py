"""The executor and the simulator make the same decisions on the same trace (one protocol, two clocks).

A tiny Mixtral decodes 40 sampled tokens after a 1-token prompt with every expert resident, recording
its routing. The CPU executor then decodes again with that routing forced and the simulator replays
the trace, both with copies that complete by the same fixed rule (demand copies at the wait,
prefetches in issue order at the next MoE layer, all of them or only the first, so that prefetches
also arrive late or are withdrawn: the executor's ``LockstepEngine``, the replay's ``lockstep`` copy
model). Every counter must be identical, for every eviction policy without prefetch, and with
``oracle`` and ``history`` prefetch.
"""

from __future__ import annotations

import pytest

from moe_runtime.core.policies import EVICTION_POLICIES, popularity_counts
from moe_runtime.core.expert_cache import access_sequence
from moe_runtime.model.checkpoint import load_model
from moe_runtime.model.experts import ResidentExperts
from moe_runtime.model.generate import generate
from moe_runtime.model.tiny import write_tiny_checkpoint
from moe_runtime.offload.engines import LockstepEngine
from moe_runtime.offload.forced_routing import ForcedRouting
from moe_runtime.offload.provider import OffloadedExperts
from moe_runtime.offload.steps import SteppedModel
from moe_runtime.predictors import PredictorOptions, make_predictor
from moe_runtime.traces import TraceMeta, TraceRecorder, save_trace
from simulator.cost_model import CostModel
from simulator.device import load_device
from simulator.replay import Replay, ReplayOptions, load_inputs

NEW, INFLIGHT, LOOKAHEAD = 40, 2, 2
COUNTERS = ("accesses", "hits", "late", "misses", "evictions", "prefetch_issued", "prefetch_used",
            "prefetch_wasted", "prefetch_cancelled", "host_computed", "fills")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(checkpoint dir, trace path): a sampled decode's routing, recorded from the resident model."""
    tmp = tmp_path_factory.mktemp("diff")
    path = write_tiny_checkpoint("mixtral", tmp / "ckpt", seed=3, num_hidden_layers=4)
    model, store = load_model(path, "cpu")
    rec = TraceRecorder(TraceMeta(model="tiny-mixtral", n_layers=store.n_moe_layers, n_experts=store.n_experts,
                                  top_k=store.top_k, expert_bytes=store.layout.nbytes, dtype="float32",
                                  source="test"))
    stepped = SteppedModel(model, ResidentExperts(store, "cpu"), chunk=1, recorder=rec)
    generate(stepped, stepped.provider, [7], NEW, temperature=1.0, seed=11)
    save_trace(rec.to_trace(), tmp / "trace.npz")
    return path, tmp / "trace.npz"


def executor_counts(path, trace, policy, predictor, n_slots, scope, per_layer, hybrid=None, host_cost=None):
    model, store = load_model(path, "cpu")
    L, E, K = store.n_moe_layers, store.n_experts, store.top_k
    forced = ForcedRouting(trace, n_moe_layers=L, n_experts=E, top_k=K)
    ids = trace.expert_ids.tolist()
    pred = make_predictor(predictor, PredictorOptions(n_moe_layers=L, n_experts=E, top_k=K, lookahead=LOOKAHEAD))
    provider = OffloadedExperts(store, "cpu", n_slots, policy=policy, scope=scope, predictor=pred, max_inflight=INFLIGHT, future=access_sequence(ids),
                                popularity=popularity_counts(trace.expert_ids),
                                make_engine=lambda n, dev: LockstepEngine(n, per_layer),
                                **(dict(miss_policy=hybrid.policy, host_cost=host_cost,
                                        host_layers=hybrid.host_layer_set(L)) if hybrid else {}))
    stepped = SteppedModel(model, provider, chunk=1, forced=forced)
    generate(stepped, provider, [7], NEW)  # routing is forced: the tokens do not matter
    r = provider.finish()
    return {k: r[k] for k in COUNTERS}


def simulator_counts(path, trace_path, policy, predictor, n_slots, scope, per_layer, hybrid=None, replay=False):
    """The replay's counters (and, with ``replay``, the Replay itself: its cost rule's inputs)."""
    trace, spec = load_inputs(trace_path, str(path))
    opts = ReplayOptions(budget=str(n_slots), eviction=policy, predictor=predictor, lookahead=LOOKAHEAD,
                         scope=scope, max_inflight=INFLIGHT,
                         **({} if hybrid is None else dict(miss_policy=hybrid.miss_policy, host_layers=hybrid.host_layers,
                                                           n_host_layers=hybrid.n_host_layers)))
    rp = Replay(trace, CostModel(spec, load_device("rtx-4060-8gb")), opts, copies="lockstep",
                lockstep_per_layer=per_layer)
    r = rp.run()
    counts = {k: r[k] for k in COUNTERS}
    return (counts, rp) if replay else counts


CASES = [(p, "none", n, "global", None) for p in EVICTION_POLICIES for n in (4, 12)] + \
        [("lru", "none", 16, "per-layer", None), ("belady", "none", 16, "per-layer", None)] + \
        [(p, pr, n, s, per) for pr in ("oracle", "history") for p in ("lru", "belady", "static")
         for n, s in ((8, "global"), (20, "global"), (24, "per-layer")) for per in (None, 1)]


@pytest.mark.parametrize("policy,predictor,n_slots,scope,per_layer", CASES)
def test_executor_and_simulator_decide_alike(recorded, policy, predictor, n_slots, scope, per_layer):
    path, trace_path = recorded
    trace, _ = load_inputs(trace_path, str(path))
    assert trace.n_tokens == NEW
    sim = simulator_counts(path, trace_path, policy, predictor, n_slots, scope, per_layer)
    exe = executor_counts(path, trace, policy, predictor, n_slots, scope, per_layer)
    assert exe == sim
    assert sim["accesses"] == NEW * trace.n_layers * trace.top_k
    if predictor != "none":
        assert sim["prefetch_issued"] > 0


HYBRID = [(m, n, hl, pr, per) for m, n, hl in (("host", 0, None), ("auto", 0, None), ("copy", 1, None),
                                               ("auto", 0, "2"), ("host", 1, "3"))
          for pr in ("none", "oracle") for per in (None, 1)]


@pytest.mark.parametrize("miss_policy,n_host_layers,host_layers,predictor,per_layer", HYBRID)
def test_hybrid_decisions_alike(recorded, miss_policy, n_host_layers, host_layers, predictor, per_layer):
    """Both halves send the same experts to the host and fill the same ones, on one cost rule: the
    executor is given the replay's own ``HostCost`` (host profile, link, device roofline)."""
    from moe_runtime.core.options import HybridOptions
    path, trace_path = recorded
    trace, _ = load_inputs(trace_path, str(path))
    hyb = HybridOptions(miss_policy=miss_policy, n_host_layers=n_host_layers, host_layers=host_layers)
    sim, rp = simulator_counts(path, trace_path, "lru", predictor, 8, "global", per_layer, hyb, replay=True)
    exe = executor_counts(path, trace, "lru", predictor, 8, "global", per_layer, hyb, rp.host_cost)
    assert exe == sim
    assert sim["host_computed"] > 0
    if miss_policy == "host" and predictor == "none":
        assert sim["hits"] == 0 and sim["host_computed"] == sim["misses"]


def test_auto_splits_and_fills_alike(recorded):
    """With a host as slow as a copy, ``auto`` splits a layer's misses between the host and copies (the
    rule's running sums), and both halves still decide alike, fills included."""
    from moe_runtime.core.options import HybridOptions
    from moe_runtime.core.protocol import HostCost
    path, trace_path = recorded
    trace, _ = load_inputs(trace_path, str(path))
    hyb = HybridOptions(miss_policy="auto")
    costs = HostCost(host_s=lambda n: 1e-3 * n, copy_s=1e-3, device_s=lambda n: 0.5e-3 * n)
    _, rp = simulator_counts(path, trace_path, "lru", "none", 8, "global", None, hyb, replay=True)
    rp.host_cost = costs
    r = rp.run()
    sim = {k: r[k] for k in COUNTERS}
    exe = executor_counts(path, trace, "lru", "none", 8, "global", None, hyb, costs)
    assert exe == sim
    assert 0 < sim["host_computed"] < sim["misses"] and sim["fills"] > 0


def test_slow_prefetches_are_late_and_withdrawn(recorded):
    """With one prefetch completing per layer, both halves see late and withdrawn prefetches alike."""
    path, trace_path = recorded
    oracle = simulator_counts(path, trace_path, "lru", "oracle", 20, "global", 1)
    history = simulator_counts(path, trace_path, "lru", "history", 20, "global", 1)
    assert oracle["late"] > 0 and history["prefetch_cancelled"] > 0
