"""Batched decoding: several prompts decode together as one static batch.

- Batched offloaded decoding gives exactly the tokens of batched resident decoding, for every family,
  eviction policy and predictor (routing forced from the resident batch's own trace where the policy or
  predictor needs the future).
- Against decoding each prompt alone (float matmuls are not batch-invariant): logits within 1e-4 at every
  step when the same tokens are fed, and the same greedy tokens wherever the solo top-1 margin exceeds 1e-3.
- The recorded trace keeps one sequence per prompt; the CLI takes repeated prompts and reports
  ``sequences``.
"""

from __future__ import annotations

import json
import tempfile

import pytest
import torch

from moe_runtime.core.budget import check_budget, fit_budget, layer_demand, minimum_slots, wave_capacity
from moe_runtime.core.errors import MoeError
from moe_runtime.core.policies import EVICTION_POLICIES
from moe_runtime.model.checkpoint import load_model
from moe_runtime.model.experts import ResidentExperts
from moe_runtime.model.generate import generate
from moe_runtime.model.tiny import FAMILIES, write_tiny_checkpoint
from moe_runtime.offload.forced_routing import ForcedRouting
from moe_runtime.offload.provider import OffloadedExperts
from moe_runtime.offload.steps import SteppedModel, steps
from moe_runtime.predictors import PREDICTORS, PredictorOptions, make_predictor
from moe_runtime.predictors.adapters import AlignedAdapters
from moe_runtime.traces import TraceMeta, TraceRecorder

PROMPTS = [[5, 17, 42, 8, 23], [3, 9], [11, 12, 13, 14, 15, 16, 17, 18]]
LENS = [len(p) for p in PROMPTS]
NEW = 5
INFLIGHT = 2
ALL_FAMILIES = (*FAMILIES, "gpt_oss-mxfp4")
_cache: dict = {}


def reference(family: str):
    """(model, store, batched resident tokens, trace of that run), built once per family."""
    if family not in _cache:
        tmp = tempfile.TemporaryDirectory(prefix=f"batched-{family}-")
        name, _, stored = family.partition("-")
        path = write_tiny_checkpoint(name, tmp.name, seed=4, num_hidden_layers=3, expert_dtype=stored or "auto")
        model, store = load_model(path, "cpu")
        rec = TraceRecorder(TraceMeta(model=family, n_layers=store.n_moe_layers, n_experts=store.n_experts,
                                      top_k=store.top_k, expert_bytes=store.layout.nbytes, dtype="float32",
                                      source="test"))
        stepped = SteppedModel(model, ResidentExperts(store, "cpu"), recorder=rec)
        res = generate(stepped, stepped.provider, PROMPTS, NEW)
        _cache[family] = (tmp, model, store, [s.token_ids for s in res.sequences], rec.to_trace())
    return _cache[family][1:]


def random_adapters(model, n_moe_layers: int, rank: int = 4) -> AlignedAdapters:
    g = torch.Generator().manual_seed(1)
    H = model.cfg.hidden_size
    ad = AlignedAdapters(n_moe_layers, H, 2, rank)
    for l, d in ad.pairs():
        ad.set(l, d, 0.1 * torch.randn(H, rank, generator=g), 0.1 * torch.randn(H, rank, generator=g))
    return ad


def run_batched(family: str, policy: str, predictor: str, budget: str = "25%", scope: str = "global"):
    model, store, ref, trace = reference(family)
    L, E, K = store.n_moe_layers, store.n_experts, store.top_k
    prefetching = predictor != "none"
    demand = layer_demand(top_k=K, batch=len(PROMPTS), n_experts=E)
    need = minimum_slots(experts_per_layer=demand, max_inflight=INFLIGHT, prefetching=prefetching, scope=scope,
                         n_moe_layers=L)
    n_slots = need if budget == "min" else max(need, L * E * int(budget[:-1]) // 100)
    cap = wave_capacity(n_slots=n_slots, scope=scope, n_moe_layers=L, max_inflight=INFLIGHT, prefetching=prefetching)
    forced = future = popularity = None
    if policy in ("belady", "static") or PREDICTORS[predictor].needs_future:
        forced = ForcedRouting(trace, n_moe_layers=L, n_experts=E, top_k=K, batch=len(PROMPTS))
        future = forced.future(steps(LENS, NEW), cap) if policy == "belady" else None
        popularity = forced.popularity()
    pred = make_predictor(predictor, PredictorOptions(n_moe_layers=L, n_experts=E, top_k=K, lookahead=2,
                                                      model=model, adapters=random_adapters(model, L),
                                                      trace=trace if predictor == "history" else None))
    provider = OffloadedExperts(store, "cpu", n_slots, policy=policy, scope=scope, predictor=pred,
                                max_inflight=INFLIGHT, future=future, popularity=popularity)
    res = generate(SteppedModel(model, provider, forced=forced), provider, PROMPTS, NEW)
    return [s.token_ids for s in res.sequences], ref, provider.finish()


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("policy", list(EVICTION_POLICIES))
def test_batched_offloaded_equals_batched_resident_every_family_and_policy(family, policy):
    tokens, ref, r = run_batched(family, policy, "gate", budget="min" if policy in ("lru", "belady") else "25%")
    assert tokens == ref
    assert r["hits"] + r["late"] + r["misses"] == r["accesses"] > 0


PREDICTOR_NAMES = [p for p in PREDICTORS if p != "recorded"]


@pytest.mark.parametrize("family", ("mixtral", "deepseek_v2", "gpt_oss"))
@pytest.mark.parametrize("predictor", PREDICTOR_NAMES)
def test_batched_offloaded_equals_batched_resident_every_predictor(family, predictor):
    tokens, ref, r = run_batched(family, "lru", predictor, budget="min", scope="per-layer")
    assert tokens == ref
    assert r["prefetch_issued"] == r["prefetch_used"] + r["prefetch_wasted"]


def test_a_batch_step_fetches_the_union_of_its_experts():
    """At 100% without prefetch every (layer, expert) the batch used misses exactly once."""
    _, store, _, trace = reference("mixtral")
    tokens, ref, r = run_batched("mixtral", "lru", "none", budget="100%")
    used = {(m, int(e)) for m in range(store.n_moe_layers) for e in trace.expert_ids[:, m].ravel()}
    assert tokens == ref and r["misses"] == len(used) and r["evictions"] == 0


def _solo_logits(model, provider, prompt, fed):
    model.setup_cache(len(prompt) + len(fed) + 1)
    out = [model(torch.tensor(prompt), torch.arange(len(prompt)), provider, last_only=True)[0]]
    for i, t in enumerate(fed):
        out.append(model(torch.tensor([t]), torch.tensor([len(prompt) + i]), provider)[0])
    return torch.stack(out)  # [1 + len(fed), V]


@torch.inference_mode()
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_batched_matches_each_prompt_decoded_alone(family):
    model, store, batched, _ = reference(family)
    provider = ResidentExperts(store, "cpu")
    solo = [generate(model, provider, p, NEW).token_ids for p in PROMPTS]
    # the same tokens fed to both: logits within 1e-4 at every step
    fed = [s[:NEW - 1] + [0] * (NEW - 1 - len(s[:NEW - 1])) for s in solo]
    ref = [_solo_logits(model, provider, p, f) for p, f in zip(PROMPTS, fed)]
    model.setup_cache(max(LENS) + NEW, batch=len(PROMPTS))
    got = [[model(torch.tensor(p), torch.arange(len(p)), provider, last_only=True, rows=b)[0]]
           for b, p in enumerate(PROMPTS)]
    for i in range(NEW - 1):
        logits = model(torch.tensor([f[i] for f in fed]), torch.tensor([n + i for n in LENS]), provider,
                       rows=list(range(len(PROMPTS))))
        for b in range(len(PROMPTS)):
            got[b].append(logits[b])
    for b in range(len(PROMPTS)):
        torch.testing.assert_close(torch.stack(got[b]), ref[b], atol=1e-4, rtol=0)
    # greedy tokens agree up to the first step whose solo top-1 margin is 1e-3 or less
    for b in range(len(PROMPTS)):
        for i, t in enumerate(solo[b]):
            if i >= len(batched[b]):
                break
            top2 = torch.topk(ref[b][i].float(), 2).values
            if top2[0] - top2[1] <= 1e-3:
                break
            assert batched[b][i] == t, (family, b, i)


def test_a_sequence_that_reaches_eos_stops_alone():
    model, store, batched, _ = reference("qwen3_moe")
    provider = ResidentExperts(store, "cpu")
    eos = batched[1][1]  # the second sequence's second token ends it
    res = generate(model, provider, PROMPTS, NEW, eos_ids=[eos])
    for got, full in zip((s.token_ids for s in res.sequences), batched):
        stop = full.index(eos) + 1 if eos in full else len(full)
        assert got == full[:stop]
    assert res.sequences[1].stopped_at_eos and len(res.sequences[1].token_ids) == 2
    decoded = sum(len(s.token_ids) - 1 for s in res.sequences)
    assert res.tokens_per_s == pytest.approx(decoded / res.decode_s)


def test_recorded_batch_keeps_one_sequence_per_prompt():
    _, _, ref, trace = reference("mixtral")
    seqs = trace.sequences()
    assert [stop - start for _, start, stop in seqs] == [n + NEW - 1 for n in LENS]
    for b, (_, start, stop) in enumerate(seqs):
        assert trace.position[start:stop].tolist() == list(range(LENS[b] + NEW - 1))
        assert (trace.phase[start:start + LENS[b]] == 0).all() and (trace.phase[start + LENS[b]:stop] == 1).all()


def test_forced_routing_needs_a_sequence_per_prompt():
    from moe_runtime.core.errors import MoeError

    _, store, _, trace = reference("mixtral")
    with pytest.raises(MoeError, match="sequences 1..3"):
        ForcedRouting(trace, n_moe_layers=store.n_moe_layers, n_experts=store.n_experts, top_k=store.top_k,
                      seq=1, batch=3)


def test_cli_repeated_prompts(run_cli, tiny_mixtral):
    base = ["generate", "--model", str(tiny_mixtral), "--max-new-tokens", "4", "--json"]
    rc, out, _ = run_cli(base + ["--prompt-ids", "5,17,42", "--prompt-ids", "3,9"])
    both = json.loads(out)
    assert rc == 0 and len(both["sequences"]) == 2 and "token_ids" not in both
    rc, out, _ = run_cli(base + ["--prompt-ids", "5,17,42", "--prompt-ids", "3,9", "--expert-budget", "8",
                                 "--predictor", "gate"])
    assert rc == 0 and json.loads(out)["sequences"] == both["sequences"]
    rc, out, _ = run_cli(base + ["--prompt-ids", "3,9"])
    one = json.loads(out)
    assert one["token_ids"] == one["sequences"][0]["token_ids"] == both["sequences"][1]["token_ids"]


def test_cli_batch_budget_adapts_to_the_union(run_cli, tiny_mixtral):
    """A budget below the batch's union (2 slots for 2 x top-2) decodes in waves, tokens unchanged; only a
    budget below one token's top-k is refused."""
    base = ["generate", "--model", str(tiny_mixtral), "--max-new-tokens", "3", "--json", "--prompt-ids", "1,2",
            "--prompt-ids", "3"]
    rc, out, _ = run_cli(base)
    resident = json.loads(out)["sequences"]
    rc, out, err = run_cli(base + ["--expert-budget", "2", "--predictor", "gate"])
    assert rc == 0 and json.loads(out)["sequences"] == resident
    assert json.loads(out)["max_inflight"] == 0  # the prefetch depth shrank to fit
    rc, _, err = run_cli(base + ["--expert-budget", "1"])
    assert rc != 0 and "below the minimum of 2 experts" in err and "one token's top-2" in err
    assert "Traceback" not in err


def test_prompts_may_be_arrays_or_tensors():
    import numpy as np

    model, store, batched, _ = reference("mixtral")
    provider = ResidentExperts(store, "cpu")
    one = generate(model, provider, PROMPTS[0], NEW).token_ids
    assert generate(model, provider, np.array(PROMPTS[0]), NEW).token_ids == one  # one prompt, not a batch
    assert generate(model, provider, torch.tensor(PROMPTS[0]), NEW).token_ids == one
    two = generate(model, provider, np.array([PROMPTS[0], PROMPTS[0]]), NEW)
    assert [s.token_ids for s in two.sequences] == [one, one]


class _Calls(OffloadedExperts):
    """Counts provider calls per (step, layer): more than one is a layer served in waves."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.calls: dict[tuple[int, int], int] = {}

    def experts(self, layer, ids, hidden, rankings=None, counts=None):
        key = (self._steps, layer)
        self.calls[key] = self.calls.get(key, 0) + 1
        return super().experts(layer, ids, hidden, rankings)


@pytest.mark.parametrize("family", ("qwen2_moe", "deepseek_v2"))
@pytest.mark.parametrize("predictor", ("none", "gate"))
@pytest.mark.parametrize("slots", ("below-union", "union-plus-one"))
def test_batches_adapt_to_a_budget_below_their_union(family, predictor, slots):
    """Below the batch's union plus the in-flight cap the run fits itself (core/budget.py's rule): the
    prefetch depth shrinks, then a decode step's union comes in waves; tokens equal the resident run."""
    model, store, ref, _ = reference(family)
    L, E, K = store.n_moe_layers, store.n_experts, store.top_k
    union = min(len(PROMPTS) * K, E)
    n_slots = K + 1 if slots == "below-union" else union + 1
    if slots == "below-union" or predictor != "none":
        with pytest.raises(MoeError):  # the old rule refused these: union + the full in-flight cap
            check_budget(n_slots, experts_per_layer=union, max_inflight=INFLIGHT, prefetching=predictor != "none",
                         scope="global", n_moe_layers=L, expert_bytes=1)
    fit = fit_budget(n_slots, top_k=K, batch=len(PROMPTS), n_experts=E, max_inflight=INFLIGHT,
                     prefetching=predictor != "none", scope="global", n_moe_layers=L, expert_bytes=1)
    assert fit.decode_waves == (slots == "below-union")
    if predictor != "none":
        assert fit.inflight == (0 if slots == "below-union" else 1)
    pred = make_predictor(predictor, PredictorOptions(n_moe_layers=L, n_experts=E, top_k=K, lookahead=2, model=model))
    provider = _Calls(store, "cpu", n_slots, predictor=pred, max_inflight=fit.inflight)
    assert provider.capacity(0) == fit.capacity
    res = generate(SteppedModel(model, provider), provider, PROMPTS, NEW)
    r = provider.finish()
    assert [s.token_ids for s in res.sequences] == ref
    decode = {k: n for k, n in provider.calls.items() if k[0] > len(PROMPTS)}  # steps after the prefills
    assert decode and (max(decode.values()) > 1) == fit.decode_waves
    assert r["hits"] + r["late"] + r["misses"] == r["accesses"] > 0
    if predictor == "gate" and slots == "union-plus-one":
        assert r["prefetch_issued"] > 0  # one slot in flight, not the asked two


def test_budget_refused_only_below_one_tokens_top_k():
    model, store, _, _ = reference("mixtral")
    with pytest.raises(MoeError, match=r"below the minimum of 2 experts .*one token's top-2"):
        fit_budget(1, top_k=2, batch=3, n_experts=8, max_inflight=4, prefetching=True, scope="global",
                   n_moe_layers=2, expert_bytes=1)
    with pytest.raises(MoeError, match=r"minimum of 4 experts .*times 2 layers for per-layer scope"):
        fit_budget(3, top_k=2, batch=3, n_experts=8, max_inflight=4, prefetching=True, scope="per-layer",
                   n_moe_layers=2, expert_bytes=1)
    fit = fit_budget(4, top_k=2, batch=3, n_experts=8, max_inflight=4, prefetching=True, scope="per-layer",
                     n_moe_layers=2, expert_bytes=1)
    assert (fit.pool, fit.union, fit.inflight, fit.capacity, fit.decode_waves) == (2, 6, 0, 2, True)
    fit = fit_budget(12, top_k=2, batch=3, n_experts=8, max_inflight=4, prefetching=True, scope="global",
                     n_moe_layers=2, expert_bytes=1)
    assert (fit.inflight, fit.capacity, fit.decode_waves) == (4, 8, False)  # room enough: nothing shrinks
