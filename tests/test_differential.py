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
            "prefetch_wasted", "prefetch_cancelled")


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


def executor_counts(path, trace, policy, predictor, n_slots, scope, per_layer):
    model, store = load_model(path, "cpu")
    L, E, K = store.n_moe_layers, store.n_experts, store.top_k
    forced = ForcedRouting(trace, n_moe_layers=L, n_experts=E, top_k=K)
    ids = trace.expert_ids.tolist()
    pred = make_predictor(predictor, PredictorOptions(n_moe_layers=L, n_experts=E, top_k=K, lookahead=LOOKAHEAD))
    provider = OffloadedExperts(store, "cpu", n_slots, policy=policy, scope=scope, predictor=pred, max_inflight=INFLIGHT, future=access_sequence(ids),
                                popularity=popularity_counts(trace.expert_ids),
                                make_engine=lambda n, dev: LockstepEngine(n, per_layer))
    stepped = SteppedModel(model, provider, chunk=1, forced=forced)
    generate(stepped, provider, [7], NEW)  # routing is forced: the tokens do not matter
    r = provider.finish()
    return {k: r[k] for k in COUNTERS}


def simulator_counts(path, trace_path, policy, predictor, n_slots, scope, per_layer):
    trace, spec = load_inputs(trace_path, str(path))
    opts = ReplayOptions(budget=str(n_slots), eviction=policy, predictor=predictor, lookahead=LOOKAHEAD,
                         scope=scope, max_inflight=INFLIGHT)
    r = Replay(trace, CostModel(spec, load_device("rtx-4060-8gb")), opts, copies="lockstep",
               lockstep_per_layer=per_layer).run()
    return {k: r[k] for k in COUNTERS}


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


def test_slow_prefetches_are_late_and_withdrawn(recorded):
    """With one prefetch completing per layer, both halves see late and withdrawn prefetches alike."""
    path, trace_path = recorded
    oracle = simulator_counts(path, trace_path, "lru", "oracle", 20, "global", 1)
    history = simulator_counts(path, trace_path, "lru", "history", 20, "global", 1)
    assert oracle["late"] > 0 and history["prefetch_cancelled"] > 0
