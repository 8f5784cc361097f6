"""Three tiers in the executor: storage -> a host-RAM tier -> device slots (offload/tiered.py).

On CPU the same ``TieredEngine`` runs with the copy thread as the device copier (the CLI keeps three tiers
for GPU runs): tokens equal the all-resident ones for every eviction policy and predictor; a device miss
that hits the host tier reads nothing (bytes read = host misses x record); a host tier of every expert
reads each used expert once; a withdrawn prefetch is never read. On a fake CUDA (events that complete at
random times) a device slot is never used before its read and its copy are done, and a host slot is never
reused while a copy out of it may run. The real CUDA path is a ``cuda``-marked test.
"""

from __future__ import annotations

import random

import pytest
import torch

from moe_runtime.core.host_tier import HostTierIndex
from moe_runtime.core.policies import EVICTION_POLICIES
from moe_runtime.model.checkpoint import load_model
from moe_runtime.model.experts import ResidentExperts
from moe_runtime.model.generate import generate
from moe_runtime.model.tiny import write_tiny_checkpoint
from moe_runtime.offload.forced_routing import ForcedRouting
from moe_runtime.offload.packed import read_header
from moe_runtime.offload.provider import OffloadedExperts
from moe_runtime.offload.steps import SteppedModel, steps
from moe_runtime.offload.storage import DiskReadEngine, aligned_pool
from moe_runtime.offload.tiered import TieredEngine, three_tier_engine
from moe_runtime.offload.tiers import pack_model
from moe_runtime.predictors import PREDICTORS, PredictorOptions, make_predictor
from moe_runtime.traces import TraceMeta, TraceRecorder
from test_offload_fake_cuda import fake_cuda  # noqa: F401  (the fake CUDA fixture, shared)

PROMPT, NEW = [5, 6, 7, 8, 9, 10], 8
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiers")
    path = write_tiny_checkpoint("mixtral", tmp / "ckpt", seed=5, num_hidden_layers=3)
    pack_model(path, tmp / "experts.pack")
    model, store = load_model(path, "cpu")
    rec = TraceRecorder(TraceMeta(model="m", n_layers=store.n_moe_layers, n_experts=store.n_experts,
                                  top_k=store.top_k, expert_bytes=store.layout.nbytes, dtype="float32", source="t"))
    stepped = SteppedModel(model, ResidentExperts(store, "cpu"), recorder=rec)
    ref = generate(stepped, stepped.provider, PROMPT, NEW).token_ids
    return model, store, read_header(tmp / "experts.pack"), ref, rec.to_trace()


def tiered_run(setup, policy, predictor, *, device_slots=6, host=8, device="cpu"):
    model, store, hdr, ref, trace = setup
    L, E, K = store.n_moe_layers, store.n_experts, store.top_k
    forced = future = None
    if policy in ("belady", "static") or PREDICTORS[predictor].needs_future:
        forced = ForcedRouting(trace, n_moe_layers=L, n_experts=E, top_k=K)
        future = forced.future(steps(len(PROMPT), NEW), device_slots - (2 if predictor != "none" else 0))
    reader = lambda n: DiskReadEngine(n, [hdr.path], threads=2, max_read=hdr.record_bytes)  # noqa: E731
    pred = make_predictor(predictor, PredictorOptions(n_moe_layers=L, n_experts=E, top_k=K, lookahead=1,
                                                      model=model, trace=trace if predictor == "history" else None))
    prov = OffloadedExperts(store, device, device_slots, policy=policy, predictor=pred, max_inflight=2,
                            future=future, popularity=forced.popularity() if forced else {(0, 0): 1.0},
                            source=lambda m, e: (m, e),
                            make_engine=three_tier_engine(reader, hdr.segments, host, store.layout,
                                                          pin=device == "cuda"))
    tokens = generate(SteppedModel(model, prov, forced=forced), prov, PROMPT, NEW).token_ids
    return tokens, ref, prov.finish(), hdr


@pytest.mark.parametrize("policy", sorted(EVICTION_POLICIES))
@pytest.mark.parametrize("predictor", ["none", "gate", "history", "oracle"])
def test_three_tiers_give_the_resident_tokens(setup, policy, predictor):
    tokens, ref, r, hdr = tiered_run(setup, policy, predictor)
    assert tokens == ref
    assert r["hits"] + r["late"] + r["misses"] == r["accesses"]
    # every device copy asked for (demand or prefetch) asked the host tier once, but a prefetch whose read
    # was withdrawn counts neither; only the reads that ran read the file
    asked = r["misses"] + r["prefetch_issued"]
    assert asked - r["prefetch_cancelled"] <= r["host_hits"] + r["host_misses"] <= asked and asked > 0
    assert r["bytes_read"] == r["host_misses"] * hdr.stride


def test_a_host_tier_of_every_expert_reads_each_used_expert_once(setup):
    _, store, _, _, trace = setup
    used = {(m, int(e)) for m in range(store.n_moe_layers) for e in trace.expert_ids[:, m].ravel()}
    tokens, ref, r, hdr = tiered_run(setup, "lru", "none", host=store.n_moe_layers * store.n_experts)
    assert tokens == ref and r["host_misses"] == len(used) and r["bytes_read"] == len(used) * hdr.stride
    assert r["misses"] > len(used)  # the device cache (6 slots) misses again; RAM serves those


class _Queued:
    """A reader that never starts a read by itself (every read stays queued until waited on)."""

    lanes, records, bytes_read, mode = ("read",), [], 0, "test"

    def __init__(self):
        self.queued, self.cancelled = {}, []

    def submit(self, slot, src, dst, demand):
        self.queued[slot] = (src, dst)

    def cancel_if_queued(self, slot):
        self.cancelled.append(slot)
        return self.queued.pop(slot, None) is not None

    def promote(self, slot):
        pass

    def poll(self):
        return []

    def wait(self, slot):
        src, dst = self.queued.pop(slot)
        dst.fill_(float(src[1]))
        self.bytes_read += 1

    def close(self):
        pass


def test_a_withdrawn_prefetch_is_never_read_and_leaves_the_tier():
    from moe_runtime.offload.engines import ThreadCopyEngine

    reader = _Queued()
    eng = TieredEngine(ThreadCopyEngine(4), reader, torch.zeros(3, 5), HostTierIndex(3), lambda m, e: (m, e))
    dst = torch.zeros(4, 5)
    try:
        eng.submit(0, (0, 1), dst[0], demand=False)
        eng.submit(1, (0, 2), dst[1], demand=False)
        eng.submit(2, (0, 2), dst[2], demand=True)  # shares the read of (0, 2)
        assert eng.cancel_if_queued(0) and (0, 1) not in eng.index.slot_of
        assert not eng.cancel_if_queued(1)  # shared with a demand: it completes
        eng.wait(2)
        eng.wait(1)
        assert torch.equal(dst[2], torch.full((5,), 2.0)) and torch.equal(dst[1], dst[2])
        assert reader.bytes_read == 1 and eng.index.misses == 1 and eng.index.hits == 1  # the withdrawn one: none
        eng.poll()
        assert eng.index.admit((1, 0)) is not None  # slots unpinned once the copies are seen done
    finally:
        eng.close()


@pytest.mark.parametrize("seed", range(6))
def test_fake_cuda_never_uses_an_unfinished_read_or_copy(fake_cuda, setup, seed, tmp_path):
    from test_offload_fake_cuda import FakeEvent

    from moe_runtime.offload.cuda_engine import CudaCopyEngine

    model, store, hdr, _, _ = setup
    FakeEvent.rng = random.Random(seed)
    rng = random.Random(seed)
    L, E, K = store.n_moe_layers, store.n_experts, store.top_k
    host = rng.randint(8, 16)
    reader = lambda n: DiskReadEngine(n, [hdr.path], threads=1, max_read=hdr.record_bytes)  # noqa: E731
    layout = store.layout

    def make(n, dev):
        pool = aligned_pool(host, layout.numel, layout.dtype)
        return TieredEngine(CudaCopyEngine(n, dev, stream_depth=2), reader(host), pool, HostTierIndex(host),
                            hdr.segments)
    pred = make_predictor("popularity", PredictorOptions(n_moe_layers=L, n_experts=E, top_k=K, lookahead=2))
    prov = OffloadedExperts(store, "cpu", rng.randint(K + 2, L * E), predictor=pred, max_inflight=2,
                            source=lambda m, e: (m, e), make_engine=make)
    eng, hidden = prov.engine, torch.zeros(1, store.layout.hidden_size)
    for step in range(10):
        prov.begin_step(step, 1)
        for m in range(L):
            ids = rng.sample(range(E), K)
            got = prov.experts(m, ids, hidden)
            for e in ids:
                slot = prov.cache.slot_of[(m, e)]
                assert eng.copier._end[slot].done, "a slot used before its copy was done or waited on"
                assert torch.equal(prov.pool[slot].view(torch.uint8), torch.from_numpy(hdr_bytes(hdr, m, e)))
            for hs in range(host):  # a pinned host slot is never handed to another expert
                assert eng.index._pins[hs] >= 0
            assert sorted(got) == sorted(ids)
            prov.end_layer(m)
    r = prov.finish()
    assert r["bytes_read"] == r["host_misses"] * hdr.stride


def hdr_bytes(hdr, m, e):
    import numpy as np

    with open(hdr.path, "rb") as f:
        f.seek(hdr.data_start + (m * hdr.n_experts + e) * hdr.stride)
        return np.frombuffer(f.read(hdr.record_bytes), dtype=np.uint8).copy()


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("policy,predictor", [("lru", "none"), ("lru", "gate"), ("belady", "oracle")])
def test_cuda_three_tiers_give_the_resident_tokens(setup, policy, predictor):
    tokens, ref, r, _ = tiered_run(setup, policy, predictor, device="cuda")
    assert tokens == ref and r["host_misses"] > 0


def test_the_host_budget_is_required_and_checked_for_gpu_runs():
    from moe_runtime.core.options import OffloadOptions
    from moe_runtime.offload.session import host_slots
    from moe_runtime.core.errors import MoeError

    shape = dict(n_layers=3, n_experts=8, top_k=2, expert_bytes=1000, batch=1)
    with pytest.raises(MoeError, match="needs --host-budget"):
        host_slots(OffloadOptions(expert_source="disk"), **shape)
    with pytest.raises(MoeError, match="below the host tier's minimum of 12"):
        host_slots(OffloadOptions(expert_source="disk", host_budget="11", predictor="popularity"), **shape)
    assert host_slots(OffloadOptions(expert_source="disk", host_budget="50%"), **shape) == 12


@pytest.mark.parametrize("family,expert_dtype", [("mixtral", "int8"), ("mixtral", "int4"), ("qwen2_moe", "int4"),
                                                 ("gpt_oss-mxfp4", "auto"), ("mixtral", "bfloat16")])
def test_quantized_experts_decode_from_disk_as_from_ram(run_cli, tmp_path, family, expert_dtype):
    import json

    name, _, stored = family.partition("-")
    path = write_tiny_checkpoint(name, tmp_path / "ckpt", seed=3, num_hidden_layers=2, expert_dtype=stored or "auto")
    rc, out, err = run_cli(["pack", "--model", path, "--expert-dtype", expert_dtype, "--out", tmp_path / "q.pack",
                            "--json"])
    assert rc == 0, err
    info = json.loads(out)
    base = ["generate", "--model", path, "--prompt-ids", "5,6,7", "--max-new-tokens", "6", "--json",
            "--expert-dtype", expert_dtype]
    rc, out, err = run_cli(base)
    assert rc == 0, err
    ram = json.loads(out)["token_ids"]
    rc, out, err = run_cli(base + ["--expert-source", f"disk:{tmp_path / 'q.pack'}", "--expert-budget", "4"])
    assert rc == 0, err
    r = json.loads(out)
    assert r["token_ids"] == ram and r["bytes_read"] >= r["misses"] * info["record_bytes"] > 0
    if expert_dtype in ("int8", "int4"):
        assert info["dtype"] == expert_dtype
