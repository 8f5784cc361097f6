"""Offloaded greedy decoding gives exactly the all-resident model's tokens, for every policy, predictor,
budget and cache scope; and the counters add up (hits + late + misses = accesses; at 100% each expert
misses at most once; at the minimum without prefetch every expert used misses at least once)."""

from __future__ import annotations

import pytest
import torch

from moe_runtime.core.budget import minimum_slots, wave_capacity
from moe_runtime.model.checkpoint import load_model
from moe_runtime.model.experts import ResidentExperts
from moe_runtime.offload.forced_routing import ForcedRouting
from moe_runtime.model.generate import generate
from moe_runtime.offload.provider import OffloadedExperts
from moe_runtime.offload.steps import SteppedModel, steps
from moe_runtime.core.policies import EVICTION_POLICIES
from moe_runtime.predictors import PredictorOptions, make_predictor
from moe_runtime.model.tiny import write_tiny_checkpoint
from moe_runtime.traces import TraceMeta, TraceRecorder

PROMPT = [5, 17, 42, 8, 23]
NEW = 5
INFLIGHT = 2
BUDGETS = ("100%", "50%", "25%", "min")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

_cache: dict = {}


def reference(family: str, device: str = "cpu", expert_dtype: str = "auto"):
    """(model, store, resident tokens, trace recorded from the resident run), built once per family and
    expert dtype. ``gpt_oss-mxfp4``: gpt_oss with MXFP4 experts as released."""
    key = (family, device, expert_dtype)
    if key not in _cache:
        import tempfile

        tmp = tempfile.TemporaryDirectory(prefix=f"offload-{family}-")  # removed when the session ends
        _cache[("dir", key)] = tmp
        name, _, stored = family.partition("-")
        path = write_tiny_checkpoint(name, tmp.name, seed=4, num_hidden_layers=3, expert_dtype=stored or "auto")
        model, store = load_model(path, device, expert_dtype=expert_dtype)
        L, E, K = store.n_moe_layers, store.n_experts, store.top_k
        rec = TraceRecorder(TraceMeta(model=family, n_layers=L, n_experts=E, top_k=K,
                                      expert_bytes=store.layout.nbytes, dtype="float32", source="test"))
        stepped = SteppedModel(model, ResidentExperts(store, device), recorder=rec)
        tokens = generate(stepped, stepped.provider, PROMPT, NEW).token_ids
        _cache[key] = (model, store, tokens, rec.to_trace())
    return _cache[key]


def run_offloaded(family, policy, predictor, budget, scope, device="cpu", expert_dtype="auto"):
    model, store, ref_tokens, trace = reference(family, device, expert_dtype)
    L, E, K = store.n_moe_layers, store.n_experts, store.top_k
    prefetching = predictor != "none"
    need = minimum_slots(experts_per_layer=K, max_inflight=INFLIGHT, prefetching=prefetching, scope=scope, n_moe_layers=L)
    n_slots = need if budget == "min" else max(need, L * E * int(budget[:-1]) // 100)
    cap = wave_capacity(n_slots=n_slots, scope=scope, n_moe_layers=L, max_inflight=INFLIGHT, prefetching=prefetching)
    forced = future = popularity = None
    if policy in ("belady", "static"):
        forced = ForcedRouting(trace, n_moe_layers=L, n_experts=E, top_k=K)
        future = forced.future(steps(len(PROMPT), NEW), cap)
        popularity = forced.popularity()
    pred = make_predictor(predictor, PredictorOptions(n_moe_layers=L, n_experts=E, top_k=K, lookahead=2, model=model))
    provider = OffloadedExperts(store, device, n_slots, policy=policy, scope=scope, predictor=pred,
                                max_inflight=INFLIGHT, future=future, popularity=popularity)
    stepped = SteppedModel(model, provider, forced=forced)
    tokens = generate(stepped, provider, PROMPT, NEW).token_ids
    report = provider.finish()
    used = {(m, int(e)) for m in range(L) for e in trace.expert_ids[:, m].ravel()}
    return tokens, ref_tokens, report, used


def check(tokens, ref_tokens, r, used, budget, predictor):
    assert tokens == ref_tokens
    assert r["hits"] + r["late"] + r["misses"] == r["accesses"] > 0
    assert r["prefetch_issued"] == r["prefetch_used"] + r["prefetch_wasted"]
    if budget == "100%":
        assert r["misses"] <= len(used)
        assert r["evictions"] == 0
        if predictor == "none":
            assert r["misses"] == len(used)
    if budget == "min" and predictor == "none":
        assert r["misses"] >= len(used)


GRID = [(p, pr, b, s) for p in EVICTION_POLICIES for pr in ("none", "gate") for b in BUDGETS
        for s in ("global", "per-layer")]


@pytest.mark.parametrize("policy,predictor,budget,scope", GRID)
def test_mixtral_full_grid(policy, predictor, budget, scope):
    check(*run_offloaded("mixtral", policy, predictor, budget, scope), budget, predictor)


SUBSET = [("lru", "gate", "25%", "global"), ("belady", "none", "min", "global"), ("static", "gate", "50%", "per-layer"),
          ("lfu", "none", "min", "per-layer"), ("layer-cyclic", "gate", "min", "global"),
          ("fifo", "none", "100%", "global")]


def forced_run(predictor: str, *, n_slots: int, lookahead: int, prior: bool = False) -> dict:
    """Offloaded greedy decode of the mixtral reference with routing forced from its own trace.

    Asserts the tokens equal the all-resident ones; returns the provider's report.
    ``prior`` also gives the trace to the predictor (history/popularity priors, noisy-oracle).
    """
    model, store, ref_tokens, trace = reference("mixtral")
    L, E, K = store.n_moe_layers, store.n_experts, store.top_k
    forced = ForcedRouting(trace, n_moe_layers=L, n_experts=E, top_k=K)
    pred = make_predictor(predictor, PredictorOptions(n_moe_layers=L, n_experts=E, top_k=K, lookahead=lookahead,
                                                      trace=trace if prior else None))
    provider = OffloadedExperts(store, "cpu", n_slots, predictor=pred, max_inflight=INFLIGHT)
    stepped = SteppedModel(model, provider, chunk=1, forced=forced)
    assert generate(stepped, provider, PROMPT, NEW).token_ids == ref_tokens
    return provider.finish()


@pytest.mark.parametrize("policy,predictor,budget,scope", SUBSET)
def test_qwen2_moe_subset(policy, predictor, budget, scope):
    check(*run_offloaded("qwen2_moe", policy, predictor, budget, scope), budget, predictor)


NEW_FAMILIES = ("deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss", "gpt_oss-mxfp4")


@pytest.mark.parametrize("family", NEW_FAMILIES)
@pytest.mark.parametrize("policy,predictor,budget,scope", SUBSET[:4])
def test_new_families_subset(family, policy, predictor, budget, scope):
    check(*run_offloaded(family, policy, predictor, budget, scope), budget, predictor)


QUANTIZED = [("mixtral", "int8"), ("mixtral", "int4"), ("qwen2_moe", "int4"), ("deepseek_v3", "int4"),
             ("gpt_oss-mxfp4", "int4"), ("gpt_oss", "bfloat16")]


@pytest.mark.parametrize("family,expert_dtype", QUANTIZED)
@pytest.mark.parametrize("policy,predictor,budget,scope", [SUBSET[0], SUBSET[3]])
def test_quantized_offloaded_equals_quantized_resident(family, expert_dtype, policy, predictor, budget, scope):
    check(*run_offloaded(family, policy, predictor, budget, scope, expert_dtype=expert_dtype), budget, predictor)


@pytest.mark.parametrize("family,expert_dtype", QUANTIZED[:2] + QUANTIZED[4:5])
def test_quantized_experts_equal_a_reference_of_their_dequantized_weights(family, expert_dtype):
    """int8/int4 decoding is exactly a plain float32 model whose experts are the dequantized weights."""
    from moe_runtime.model.experts import HostExpertStore
    from moe_runtime.model.formats import DenseExpert, format_for

    model, store, tokens, _ = reference(family, "cpu", expert_dtype)
    plain = format_for(model.cfg, "float32", torch.float32)
    ref = HostExpertStore(plain, store.n_experts, store.top_k, store.model_layers, pin=False)
    for m in range(store.n_moe_layers):
        for e in range(store.n_experts):
            plain.pack(ref.flat(m, e), DenseExpert(*store.layout.dense(store.weights(m, e))))
    fmt = model.expert_format
    try:
        model.expert_format = plain
        assert generate(model, ResidentExperts(ref, "cpu"), PROMPT, NEW).token_ids == tokens
        model.setup_cache(len(PROMPT))
        with torch.inference_mode():
            a = model(torch.tensor(PROMPT), torch.arange(len(PROMPT)), ResidentExperts(ref, "cpu"))
            model.expert_format = fmt
            b = model(torch.tensor(PROMPT), torch.arange(len(PROMPT)), ResidentExperts(store, "cpu"))
        assert torch.equal(a, b)
    finally:
        model.expert_format = fmt
    assert store.layout.nbytes < ref.layout.nbytes * (0.3 if expert_dtype == "int4" else 0.6)


def test_forced_routing_reproduces_and_oracle_prefetches():
    """Forcing the recorded routing gives the same tokens; the oracle's prefetches are all used."""
    r = forced_run("oracle", n_slots=12, lookahead=1)
    assert r["prefetch_issued"] > 0 and r["prefetch_wasted"] == 0


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("policy,predictor,budget,scope", SUBSET + [("belady", "gate", "25%", "global")])
def test_cuda_parity(policy, predictor, budget, scope):
    check(*run_offloaded("mixtral", policy, predictor, budget, scope, device="cuda"), budget, predictor)


@pytest.mark.parametrize("predictor", ["history", "popularity", "noisy-oracle"])
def test_registry_predictors_keep_parity(predictor):
    r = forced_run(predictor, n_slots=8, lookahead=2, prior=True)
    assert r["prefetch_issued"] > 0 and r["hits"] + r["late"] + r["misses"] == r["accesses"]


def plain_lru_misses(keys, capacity):
    """A plain LRU over ``keys`` in order; the keys of one (step, layer) (a run of one layer), or of one
    wave of ``capacity`` of them when the run is longer, are all protected from eviction while it is
    served, as DESIGN pins them."""
    from collections import OrderedDict
    from itertools import groupby

    resident, misses = OrderedDict(), 0
    groups = [g[i:i + capacity] for _, run in groupby(keys, key=lambda k: k[0]) for g in [list(run)]
              for i in range(0, len(g), capacity)]
    for group in groups:
        for k in group:
            if k in resident:
                resident.move_to_end(k)
                continue
            misses += 1
            if len(resident) == capacity:
                del resident[next(x for x in resident if x not in group)]
            resident[k] = None
    return misses


@pytest.mark.parametrize("n_slots", [2, 3, 5, 9, 24])
def test_executor_lru_misses_equal_a_plain_lru_over_the_same_accesses(n_slots):
    model, store, ref_tokens, trace = reference("mixtral")
    L, E, K = store.n_moe_layers, store.n_experts, store.top_k
    forced = ForcedRouting(trace, n_moe_layers=L, n_experts=E, top_k=K)
    provider = OffloadedExperts(store, "cpu", n_slots, policy="lru")
    stepped = SteppedModel(model, provider, forced=forced)
    assert generate(stepped, provider, PROMPT, NEW).token_ids == ref_tokens
    r = provider.finish()
    keys = forced.future(steps(len(PROMPT), NEW), n_slots)
    assert r["accesses"] == len(keys)
    assert r["misses"] == plain_lru_misses(keys, n_slots)


class _Waves(ResidentExperts):
    """The all-resident provider, made to serve at most ``cap`` experts a call (so a prompt comes in waves)."""

    def __init__(self, store, cap):
        super().__init__(store, "cpu")
        self.cap, self.calls = cap, []

    def capacity(self, layer):
        return self.cap

    def experts(self, layer, ids, hidden, *ranked):
        assert len(ids) <= self.cap
        self.calls.append((layer, list(ids)))
        return super().experts(layer, ids, hidden)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2", "gpt_oss"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_waves_equal_one_call_bitwise(family, dtype, tmp_path):
    """A prompt whose union exceeds the cache comes in waves of ascending ids; the logits equal one call's
    bit for bit (the experts compute from their views, one at a time, in id order either way)."""
    path = write_tiny_checkpoint(family, tmp_path / family, seed=4, num_hidden_layers=3)
    model, store = load_model(path, "cpu", dtype)
    prompt = torch.tensor(list(range(3, 40)))
    pos = torch.arange(len(prompt))
    with torch.inference_mode():
        model.setup_cache(len(prompt))
        one = model(prompt, pos, ResidentExperts(store, "cpu"))
        waves = _Waves(store, store.top_k + 1)
        model.setup_cache(len(prompt))
        split = model(prompt, pos, waves)
    assert torch.equal(one, split)
    per_layer = [[ids for m, ids in waves.calls if m == layer] for layer in range(store.n_moe_layers)]
    assert all(len(c) > 1 for c in per_layer)  # the union really exceeded the cap
    for c in per_layer:
        flat = [e for wave in c for e in wave]
        assert flat == sorted(flat) and len(set(flat)) == len(flat)
