"""Decode steps as captured segments (``--cuda-graphs``, graphs.py).

On CPU the segments run eagerly through the same static buffers and host steps (``EagerGraphs``): tokens
equal the plain decode for every family, resident and offloaded, alone and batched, including a batch whose
running set shrinks (captured again). The CUDA tests replay real CUDA graphs and skip without a GPU.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from torch.overrides import TorchFunctionMode

from moe_runtime.core.budget import minimum_slots
from moe_runtime.core.errors import MoeError
from moe_runtime.model import graphs
from moe_runtime.model.checkpoint import load_model
from moe_runtime.model.experts import ResidentExperts
from moe_runtime.model.generate import generate
from moe_runtime.model.tiny import FAMILIES, write_tiny_checkpoint
from moe_runtime.offload.forced_routing import ForcedRouting
from moe_runtime.offload.provider import OffloadedExperts
from moe_runtime.offload.steps import SteppedModel
from moe_runtime.predictors import PredictorOptions, make_predictor

PROMPTS = [[5, 17, 42, 8, 23], [3, 9], [11, 12, 13, 14, 15, 16, 17, 18]]
NEW = 6
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
_models: dict = {}


def tiny(family: str, device: str = "cpu"):
    if (family, device) not in _models:
        tmp = tempfile.TemporaryDirectory(prefix=f"graphs-{family}-")
        path = write_tiny_checkpoint(family, tmp.name, seed=4, num_hidden_layers=3)
        _models[(family, device)] = (tmp, *load_model(path, device))
    return _models[(family, device)][1:]


def offloaded(model, store, device, policy="lru", predictor="gate", batch=1):
    L, E, K = store.n_moe_layers, store.n_experts, store.top_k
    need = minimum_slots(experts_per_layer=min(batch * K, E), max_inflight=2, prefetching=predictor != "none",
                         scope="global", n_moe_layers=L)
    pred = make_predictor(predictor, PredictorOptions(n_moe_layers=L, n_experts=E, top_k=K, lookahead=2, model=model))
    provider = OffloadedExperts(store, device, need, policy=policy, predictor=pred, max_inflight=2)
    return SteppedModel(model, provider), provider


def tokens(res):
    return [s.token_ids for s in res.sequences] if hasattr(res, "sequences") else res.token_ids


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompts", [PROMPTS[0], PROMPTS], ids=["alone", "batch"])
def test_segments_give_the_plain_tokens(family, prompts):
    model, store = tiny(family)
    ref = tokens(generate(model, ResidentExperts(store, "cpu"), prompts, NEW))
    assert tokens(generate(model, ResidentExperts(store, "cpu"), prompts, NEW, cuda_graphs=True)) == ref
    batch = 1 if isinstance(prompts[0], int) else len(prompts)
    for policy, predictor in (("lru", "gate"), ("lfu", "none")):
        stepped, provider = offloaded(model, store, "cpu", policy, predictor, batch)
        assert tokens(generate(stepped, provider, prompts, NEW, cuda_graphs=True)) == ref
        r = provider.finish()
        assert r["hits"] + r["late"] + r["misses"] == r["accesses"] > 0


def test_a_shrinking_batch_is_captured_again(monkeypatch):
    model, store = tiny("mixtral")
    provider = ResidentExperts(store, "cpu")
    ref = tokens(generate(model, provider, PROMPTS, NEW))
    eos = ref[0][2]  # the first sequence stops at its third token (a token no other sequence makes before)
    assert all(eos not in r[:3] for r in ref[1:])
    ref = tokens(generate(model, provider, PROMPTS, NEW, eos_ids=[eos]))
    captures = []
    real = graphs.GraphedStep.__init__

    def counting(self, *a, **k):
        captures.append(a[2] if isinstance(a[2], int) else tuple(a[2].tolist()))
        real(self, *a, **k)
    monkeypatch.setattr(graphs.GraphedStep, "__init__", counting)
    assert tokens(generate(model, provider, PROMPTS, NEW, eos_ids=[eos], cuda_graphs=True)) == ref
    assert captures == [(0, 1, 2), (1, 2)]


class HostValues(TorchFunctionMode):
    """Counts what a CUDA graph cannot hold: host reads of tensor values, and tensors built from host data
    (a blocking upload at run time, and illegal during capture)."""
    NAMES = {"tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "tensor", "as_tensor",
             "from_numpy", "nonzero", "masked_select", "unique", "unique_consecutive"}  # the last: data-dependent
             # shapes, a sync on CUDA

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


def aligned_predictor(model, store):
    from moe_runtime.predictors.adapters import AlignedAdapters

    L, H = store.n_moe_layers, model.cfg.hidden_size
    adapters = AlignedAdapters(L, H, lookahead=2, rank=4)
    gen = torch.Generator().manual_seed(0)
    for l, d in adapters.pairs():
        adapters.set(l, d, 0.1 * torch.randn(H, 4, generator=gen), 0.1 * torch.randn(H, 4, generator=gen))
    pred = make_predictor("aligned", PredictorOptions(n_moe_layers=L, n_experts=store.n_experts, top_k=store.top_k,
                                                      lookahead=2, model=model, adapters=adapters))
    # moved to the model's device and dtype once, not per prediction
    assert {t.dtype for t in [*adapters.U.values(), *adapters.V.values()]} == {model.dtype}
    return pred


@pytest.mark.parametrize("family,expert_dtype,predictor", [("gpt_oss", "mxfp4", "gate"),
                                                           ("mixtral", "auto", "aligned")])
def test_segments_use_no_host_values(monkeypatch, tmp_path, family, expert_dtype, predictor):
    path = write_tiny_checkpoint(family, tmp_path / family, seed=4, num_hidden_layers=3, expert_dtype=expert_dtype)
    model, store = load_model(path, "cpu", dtype=torch.bfloat16)
    ref = tokens(generate(model, ResidentExperts(store, "cpu"), PROMPTS, NEW))
    L, E, K = store.n_moe_layers, store.n_experts, store.top_k
    pred = (aligned_predictor(model, store) if predictor == "aligned" else
            make_predictor(predictor, PredictorOptions(n_moe_layers=L, n_experts=E, top_k=K, lookahead=2, model=model)))
    provider = OffloadedExperts(store, "cpu", L * E, predictor=pred, max_inflight=2)
    seen = HostValues()

    class Watched(graphs.EagerGraphs):  # every segment, captured and replayed, under the count
        def capture(self, fn):
            def watched():
                with seen:
                    return fn()
            return super().capture(watched)
    monkeypatch.setattr(graphs, "EagerGraphs", Watched)
    got = tokens(generate(SteppedModel(model, provider), provider, PROMPTS, NEW, cuda_graphs=True))
    provider.finish()
    assert got == ref
    assert seen.seen == []


def test_graphs_serve_a_union_beyond_the_pool_in_waves():
    """The expert compute runs eagerly between the replayed segments, so a batch whose union exceeds one
    layer's pool (room for one sequence's top-k only) comes in waves under graphs too, tokens unchanged."""
    model, store = tiny("mixtral")
    ref = tokens(generate(model, ResidentExperts(store, "cpu"), PROMPTS, NEW))
    stepped, provider = offloaded(model, store, "cpu", batch=1)
    assert tokens(generate(stepped, provider, PROMPTS, NEW, cuda_graphs=True)) == ref
    r = provider.finish()
    assert r["hits"] + r["late"] + r["misses"] == r["accesses"] > 0


def test_forced_routing_is_refused():
    model, store = tiny("mixtral")
    from moe_runtime.traces import TraceMeta, TraceRecorder

    rec = TraceRecorder(TraceMeta(model="m", n_layers=store.n_moe_layers, n_experts=store.n_experts,
                                  top_k=store.top_k, expert_bytes=store.layout.nbytes, dtype="float32", source="t"))
    stepped = SteppedModel(model, ResidentExperts(store, "cpu"), recorder=rec)
    with pytest.raises(MoeError, match="cannot force or record"):
        generate(stepped, stepped.provider, PROMPTS[0], NEW, cuda_graphs=True)
    forced = SteppedModel(model, ResidentExperts(store, "cpu"),
                          forced=ForcedRouting(rec_trace(model, store), n_moe_layers=store.n_moe_layers,
                                               n_experts=store.n_experts, top_k=store.top_k))
    with pytest.raises(MoeError, match="cannot force or record"):
        generate(forced, forced.provider, PROMPTS[0], NEW, cuda_graphs=True)


def rec_trace(model, store):
    from moe_runtime.traces import TraceMeta, TraceRecorder

    rec = TraceRecorder(TraceMeta(model="m", n_layers=store.n_moe_layers, n_experts=store.n_experts,
                                  top_k=store.top_k, expert_bytes=store.layout.nbytes, dtype="float32", source="t"))
    stepped = SteppedModel(model, ResidentExperts(store, "cpu"), recorder=rec)
    generate(stepped, stepped.provider, PROMPTS[0], NEW)
    return rec.to_trace()


def test_cli_refuses_graphs_on_cpu(run_cli, tiny_mixtral):
    rc, _, err = run_cli(["generate", "--model", tiny_mixtral, "--prompt-ids", "1,2", "--device", "cpu",
                          "--cuda-graphs"])
    assert rc != 0 and "--cuda-graphs needs --device cuda" in err and "Traceback" not in err


@CUDA
@pytest.mark.parametrize("family", ("mixtral", "deepseek_v2", "gpt_oss"))
def test_cuda_graphs_give_the_eager_tokens(family):
    model, store = tiny(family, "cuda")
    ref = tokens(generate(model, ResidentExperts(store, "cuda"), PROMPTS[0], NEW))
    assert tokens(generate(model, ResidentExperts(store, "cuda"), PROMPTS[0], NEW, cuda_graphs=True)) == ref
    stepped, provider = offloaded(model, store, "cuda")
    assert tokens(generate(stepped, provider, PROMPTS[0], NEW, cuda_graphs=True)) == ref
    provider.finish()
    bref = tokens(generate(model, ResidentExperts(store, "cuda"), PROMPTS, NEW))
    stepped, provider = offloaded(model, store, "cuda", batch=len(PROMPTS))
    assert tokens(generate(stepped, provider, PROMPTS, NEW, cuda_graphs=True)) == bref
    provider.finish()
