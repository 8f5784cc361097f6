"""Randomised: whatever the budget, policy, scope, prefetch plans and routing, no slot in use or still
loading is ever overwritten, and every expert handed to the compute holds exactly its host weights."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_runtime.core.budget import minimum_slots
from moe_runtime.core.expert_cache import Outcome
from moe_runtime.model.experts import ExpertLayout, HostExpertStore
from moe_runtime.offload.cuda_engine import make_copy_engine
from moe_runtime.offload.provider import OffloadedExperts
from moe_runtime.core.policies import EVICTION_POLICIES
from moe_runtime.predictors import PredictContext, Predictor, PredictorOptions

L, E, K = 3, 6, 2


class RandomPredictor(Predictor):
    """Predicts random experts for l+1..l+D (wrong ones included), to stress prefetch and cancellation."""

    name = "random"

    def __init__(self, opts: PredictorOptions, seed: int) -> None:
        super().__init__(opts)
        self.rng = np.random.default_rng(seed)

    def predict(self, ctx: PredictContext) -> list[np.ndarray]:
        return [self.rng.permutation(E) for _ in self.distances(ctx.layer)]


def make_store() -> HostExpertStore:
    store = HostExpertStore(ExpertLayout(8, 4, torch.float32), E, K, list(range(L)), pin=False)
    for m in range(L):
        store.layer_buffer(m).copy_(torch.arange(E * store.layout.numel, dtype=torch.float32).view(E, -1) + 1000 * m)
    return store


class CheckedEngine:
    """Wraps the real copy engine and asserts each copy's target slot is neither pinned nor still loading."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.protocol = None  # set once the provider exists
        self.loading: set[int] = set()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def submit(self, slot, src, dst, demand):
        assert slot not in self.loading, f"slot {slot} overwritten while loading"
        # slots of the current layer that hold data the compute will read (copies are issued only
        # inside the protocol's layer(), when in_use is the current layer's)
        pinned_ready = {s for _, s, o in self.protocol.in_use if o == Outcome.HIT}
        assert slot not in pinned_ready, f"slot {slot} overwritten while in use"
        self.loading.add(slot)
        self.engine.submit(slot, src, dst, demand)

    def cancel_if_queued(self, slot):
        ok = self.engine.cancel_if_queued(slot)
        if ok:
            self.loading.discard(slot)
        return ok

    def poll(self):
        done = self.engine.poll()
        self.loading.difference_update(done)
        return done

    def wait(self, slot):
        self.engine.wait(slot)
        self.loading.discard(slot)


routing = st.lists(  # steps x layers x tokens (1..3 per step) x top-k distinct ids
    st.lists(st.lists(st.permutations(range(E)).map(lambda p: p[:K]), min_size=1, max_size=3),
             min_size=L, max_size=L),
    min_size=1, max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=st.sampled_from(sorted(EVICTION_POLICIES)), scope=st.sampled_from(["global", "per-layer"]),
       prefetch=st.booleans(), extra=st.integers(0, L * E), inflight=st.integers(1, 3), steps=routing,
       lookahead=st.integers(1, 2), seed=st.integers(0, 100))
def test_no_slot_in_use_or_loading_is_overwritten(policy, scope, prefetch, extra, inflight, steps, lookahead, seed):
    store = make_store()
    # the union of a step's tokens must fit a pool: size the minimum for the largest step
    per_layer = max(len({e for tok in layer for e in tok}) for step in steps for layer in step)
    need = minimum_slots(experts_per_layer=per_layer, max_inflight=inflight, prefetching=prefetch,
                         scope=scope, n_moe_layers=L)
    n_slots = min(need + extra, L * E if scope == "global" else need + extra)
    keys = [[list(dict.fromkeys(e for tok in layer for e in tok)) for layer in step] for step in steps]
    future = [(m, e) for step in keys for m, ids in enumerate(step) for e in ids]
    popularity = {k: float(future.count(k)) for k in set(future)}
    pred = RandomPredictor(PredictorOptions(n_moe_layers=L, n_experts=E, top_k=K, lookahead=lookahead), seed) \
        if prefetch else None
    engines = []
    prov = OffloadedExperts(store, "cpu", n_slots, policy=policy, scope=scope, predictor=pred, max_inflight=inflight, future=future, popularity=popularity,
                            make_engine=lambda n, dev: engines.append(CheckedEngine(make_copy_engine(n, dev)))
                            or engines[0])
    prov.cache.experts_per_layer = per_layer  # prefetches leave room for the widest step's demand
    checked = engines[0]
    checked.protocol = prov.protocol
    hidden = torch.zeros(1, 8)
    for i, step in enumerate(keys):
        prov.begin_step(i, 1)
        for m, ids in enumerate(step):
            got = prov.experts(m, ids, hidden)
            assert sorted(got) == sorted(ids)
            for e, w in got.items():  # the compute reads exactly the host weights
                assert torch.equal(torch.cat([w.w1.flatten(), w.w3.flatten(), w.w2.flatten()]), store.flat(m, e))
            prov.end_layer(m)
    r = prov.finish()
    assert r["hits"] + r["late"] + r["misses"] == r["accesses"] == len(future)
    assert r["prefetch_issued"] == r["prefetch_used"] + r["prefetch_wasted"]
