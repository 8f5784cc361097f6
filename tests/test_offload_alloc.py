"""The provider's side of a decode step allocates no memory: only the slot table changes.

Measured with the torch profiler's allocation events inside ``provider.experts`` (predictor ``none`` and
``oracle``, forced routing); ``gate`` is the positive control (its router matmuls do allocate)."""

from __future__ import annotations

import pytest
from torch.profiler import ProfilerActivity, profile, record_function

from moe_runtime.offload.forced_routing import ForcedRouting
from moe_runtime.model.generate import generate
from moe_runtime.offload.provider import OffloadedExperts
from moe_runtime.offload.steps import SteppedModel
from moe_runtime.predictors import PredictorOptions, make_predictor
from test_offload_parity import NEW, PROMPT, reference


def bytes_allocated_in_provider(predictor: str) -> int:
    model, store, _, trace = reference("mixtral")
    L, E, K = store.n_moe_layers, store.n_experts, store.top_k
    forced = ForcedRouting(trace, n_moe_layers=L, n_experts=E, top_k=K)
    pred = make_predictor(predictor, PredictorOptions(n_moe_layers=L, n_experts=E, top_k=K, lookahead=1, model=model))
    prov = OffloadedExperts(store, "cpu", 8, predictor=pred, max_inflight=2)
    inner = prov.experts

    def experts(layer, ids, hidden, *ranked):
        with record_function("provider.experts"):
            return inner(layer, ids, hidden, *ranked)

    prov.experts = experts
    prep = prov.prepare

    def prepare(layer, hidden):  # a router-based predictor's device work runs here, before the ids are fetched
        with record_function("provider.prepare"):
            return prep(layer, hidden)

    prov.prepare = prepare
    stepped = SteppedModel(model, prov, chunk=1, forced=forced)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        generate(stepped, prov, PROMPT, NEW)
    prov.finish()
    events = prof.events()
    spans = [(e.time_range.start, e.time_range.end) for e in events
             if e.name in ("provider.experts", "provider.prepare")]
    assert len(spans) == 2 * L * (len(PROMPT) + NEW - 1)
    # allocations are attributed to the op that made them (self), or stand alone as "[memory]" events
    return sum(max(e.self_cpu_memory_usage, 0) for e in events
               if e.name not in ("provider.experts", "provider.prepare")
               and any(a <= e.time_range.start <= b for a, b in spans))


@pytest.mark.parametrize("predictor", ["none", "oracle"])
def test_provider_allocates_nothing(predictor):
    assert bytes_allocated_in_provider(predictor) == 0


def test_the_measurement_sees_allocations():
    assert bytes_allocated_in_provider("gate") > 0
