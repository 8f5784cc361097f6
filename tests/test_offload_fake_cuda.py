"""The CUDA copy engine's bookkeeping on a fake CUDA (no GPU here): events complete at random times, and
the compute must never use a slot whose copy it has neither seen complete nor waited on."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

from moe_runtime.offload.cuda_engine import CudaCopyEngine
from moe_runtime.model.experts import ExpertLayout, HostExpertStore
from moe_runtime.offload.provider import OffloadedExperts
from moe_runtime.core.policies import EVICTION_POLICIES
from moe_runtime.predictors import PredictContext, Predictor, PredictorOptions

L, E, K = 3, 6, 2


class FakeEvent:
    rng = random.Random(0)
    clock = 0

    def __init__(self, enable_timing: bool = False) -> None:
        self.done, self.t = True, 0

    def record(self, stream=None) -> None:
        FakeEvent.clock += 1
        self.done, self.t = False, FakeEvent.clock

    def query(self) -> bool:
        if not self.done and self.rng.random() < 0.4:  # the GPU gets there at some point
            self.done = True
        return self.done

    def synchronize(self) -> None:
        self.done = True

    def elapsed_time(self, other: "FakeEvent") -> float:
        return float(other.t - self.t)


class FakeStream:
    def __init__(self, device=None, priority: int = 0) -> None:
        self.priority = priority

    @staticmethod
    def priority_range():
        return 0, -1

    def wait_event(self, ev: FakeEvent) -> None:
        if self is COMPUTE:
            ev.done = True  # everything the compute issues after this runs after the copy

    def synchronize(self) -> None:
        pass


COMPUTE = FakeStream()


class RandomPredictor(Predictor):
    name = "random"

    def __init__(self, opts, rng) -> None:
        super().__init__(opts)
        self.rng = rng

    def predict(self, ctx: PredictContext):
        return [self.rng.sample(range(E), E) for _ in self.distances(ctx.layer)]


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: COMPUTE)


@pytest.mark.parametrize("seed", range(12))
def test_cuda_engine_never_hands_out_an_unfinished_copy(fake_cuda, seed):
    rng = random.Random(seed)
    FakeEvent.rng = random.Random(seed)
    store = HostExpertStore(ExpertLayout(4, 2, torch.float32), E, K, list(range(L)), pin=False)
    policy = rng.choice(sorted(p for p in EVICTION_POLICIES if p != "belady"))
    inflight = rng.randint(1, 3)
    n_slots = rng.randint(K + inflight, L * E)
    pred = RandomPredictor(PredictorOptions(n_moe_layers=L, n_experts=E, top_k=K, lookahead=2), rng)
    depth = rng.randint(1, 2)
    prov = OffloadedExperts(store, "cpu", n_slots, policy=policy, predictor=pred,
                            max_inflight=inflight, popularity={(0, 0): 1.0},
                            make_engine=lambda n, dev: CudaCopyEngine(n, dev, stream_depth=depth))
    engine = prov.engine
    hidden = torch.zeros(1, 4)
    for step in range(8):
        prov.begin_step(step, 1)
        for m in range(L):
            ids = rng.sample(range(E), K)
            got = prov.experts(m, ids, hidden)
            assert sorted(got) == sorted(ids)
            for e in ids:
                slot = prov.cache.slot_of[(m, e)]
                assert engine._end[slot].done, f"slot {slot} used before its copy finished or was waited on"
                assert slot not in engine._on_stream or engine._end[slot].done
            prov.end_layer(m)
    r = prov.finish()
    assert r["hits"] + r["late"] + r["misses"] == r["accesses"] == 8 * L * K
    assert r["prefetch_issued"] == r["prefetch_used"] + r["prefetch_wasted"]
    assert r["copies"] == r["misses"] + r["prefetch_issued"] - r["prefetch_cancelled"]
    assert not engine._on_stream and not engine._queue
