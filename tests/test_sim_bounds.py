"""The fast Belady count equals the runtime ExpertCache's (whole-layer pinning, per-layer pools), and
the disk cache returns what was computed."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_runtime.core.expert_cache import ExpertCache, Outcome, access_sequence
from simulator import bounds as B
from simulator.workload import build_workload, load_inputs
from cache_reference import access_layer

TRACES = Path(__file__).resolve().parent.parent / "traces"


def cache_belady(ids, n_slots, scope, n_layers):
    """The count as the runtime cache makes it: ExpertCache, policy belady, no prefetch."""
    per_layer = max(len(x) for step in ids for x in step)
    cache = ExpertCache(n_slots=n_slots, n_moe_layers=n_layers, n_experts=1 + max(e for s in ids for x in s for e in x),
                        experts_per_layer=per_layer, expert_bytes=0, policy="belady", scope=scope,
                        future=access_sequence(ids))
    for step in ids:
        cache.begin_step()
        for layer, layer_ids in enumerate(step):
            for _, slot, outcome in access_layer(cache, layer, layer_ids).outcomes:
                if outcome == Outcome.MISS:
                    cache.copy_done(slot)
            cache.release_layer()
    return cache.finish().misses


@pytest.mark.parametrize("name,tokens,batch,scope,slots", [
    ("mixtral-8x7b-humaneval.npz", 300, 1, "global", 20),
    ("mixtral-8x7b-humaneval.npz", 300, 4, "per-layer", 6 * 32),
    ("deepseek-v2-lite-law.npz", 80, 1, "global", 200),
    ("deepseek-v2-lite-summary.npz", 120, 4, "per-layer", 26 * 30),
])
def test_fast_belady_equals_the_cache(name, tokens, batch, scope, slots):
    trace, _ = load_inputs(TRACES / name, None, tokens)
    ids = build_workload(trace, batch).ids
    want = cache_belady(ids, slots, scope, trace.n_layers)
    assert B.belady_misses(ids, slots, scope, trace.n_layers) == want > 0


def test_pinning_keeps_the_layers_experts():
    # With 2 slots, the miss of (0, 1) in step 1 must not evict (0, 0), accessed just before in the same
    # layer-step, although plain Belady would (its next use is furthest away at that point).
    ids = [[[0, 1], [0]], [[0, 1], [1]]]  # 2 steps x 2 layers: keys (0,0) (0,1) (1,0), then (0,0) (0,1) (1,1)
    for slots in (2, 3, 4):
        assert B.belady_misses(ids, slots, "global", 2) == cache_belady(ids, slots, "global", 2)


def test_disk_cache_round_trip(tmp_path):
    trace, _ = load_inputs(TRACES / "mixtral-8x7b-humaneval.npz", None, 50)
    ids = build_workload(trace, 1).ids
    cache = B.BoundsCache(tmp_path / "c")
    key = B.BoundsCache.key(B.trace_digest(trace), 20, "global", 50, 1)
    B._MEMO.clear()
    n = B.cached_belady_misses(ids, n_slots=20, scope="global", n_moe_layers=32, key=key, cache=cache)
    assert cache.get(key) == n == B.belady_misses(ids, 20, "global", 32)
    B._MEMO.clear()
    cache.put(key, n + 1)  # what put stored (and can be a count of this trace) is what is returned
    assert B.cached_belady_misses(ids, n_slots=20, scope="global", n_moe_layers=32, key=key, cache=cache) == n + 1
    (tmp_path / "c" / f"{key}.json").write_text("not json")  # unreadable: computed again and rewritten
    B._MEMO.clear()
    assert B.cached_belady_misses(ids, n_slots=20, scope="global", n_moe_layers=32, key=key, cache=cache) == n
    assert cache.get(key) == n
    assert B.trace_digest(trace) != B.trace_digest(trace.slice(0, 49))
