"""Trace statistics on hand-worked tiny traces; synthetic traces and fitting."""

import math

import numpy as np
import pytest

from moe_runtime.core.errors import MoeError
from moe_runtime.traces import TraceMeta, make_trace
from moe_runtime.traces.stats import compute_stats, cross_layer_recall, reuse
from moe_runtime.traces.synth import SynthKnobs, fit_knobs, headline, synth_trace

META = TraceMeta(model="tiny", n_layers=2, n_experts=4, top_k=2, expert_bytes=0, dtype="bfloat16", source="t")
# token x layer x rank; worked out by hand in the comments below
IDS = [[[0, 1], [2, 3]],
       [[1, 2], [2, 3]],
       [[0, 1], [0, 1]]]


def tiny(seq_id=(0, 0, 0)):
    return make_trace(META, IDS, np.full((3, 2, 2), 0.5), seq_id=seq_id, position=[0, 1, 2])


def test_popularity_entropy_and_overlap_by_hand():
    s = compute_stats(tiny())
    # layer 0 counts e0:2 e1:3 e2:1 e3:0 of 6; layer 1 counts 1, 1, 2, 2
    h0 = -(1 / 3 * math.log2(1 / 3) + 1 / 2 * math.log2(1 / 2) + 1 / 6 * math.log2(1 / 6))
    h1 = -(2 * 1 / 6 * math.log2(1 / 6) + 2 * 1 / 3 * math.log2(1 / 3))
    np.testing.assert_allclose(s.entropy_bits, [h0, h1])
    np.testing.assert_allclose(s.entropy_norm, [h0 / 2, h1 / 2])
    np.testing.assert_allclose(s.top_share, [3 / 6, 2 / 6])  # ceil(4/8) = 1 expert
    # layer 0: {0,1}&{1,2} = 1, {1,2}&{0,1} = 1 -> 0.5; layer 1: 2 then 0 -> 0.5
    np.testing.assert_allclose(s.overlap, [0.5, 0.5])
    # a sequence break between tokens 1 and 2 leaves only the first pair
    np.testing.assert_allclose(compute_stats(tiny((0, 0, 1))).overlap, [0.5, 1.0])


def test_cross_layer_recall_by_hand():
    # C[i, j] over tokens: C[0] = [1,1,1,1], C[1] = [1,1,2,2], C[2] = [0,0,1,1].
    # t0 scores C0+C1 = [2,2,3,3] -> {2,3}: 2 of 2; t1 C1+C2 = [1,1,3,3] -> {2,3}: 2 of 2;
    # t2 C0+C1 -> {2,3} but truth {0,1}: 0 -> recall 4/6. Popularity {2,3}: also 4/6.
    co, pop = cross_layer_recall(tiny())
    np.testing.assert_allclose(co, [2 / 3])
    np.testing.assert_allclose(pop, [2 / 3])


def test_reuse_distances_by_hand():
    gaps, dists, cold = reuse(tiny())
    # layer 0: t1 e1 (d0, gap1), t2 e0 (d2: e1 e2, gap2), t2 e1 (d2: e2 e0, gap1);
    # layer 1: t1 e2 (d1: e3), t1 e3 (d1: e2); 7 first accesses
    assert cold == 7
    assert sorted(zip(gaps.tolist(), dists.tolist())) == [(1, 0), (1, 1), (1, 1), (1, 2), (2, 2)]
    s = compute_stats(tiny())
    assert s.lru_hit_rate == {"2": round(3 / 12, 4), "4": round(5 / 12, 4)}
    assert s.distance_histogram == {"0": 0.2, "1": 0.4, "2-3": 0.4}


def _lru_hits(trace, capacity: int) -> int:
    """A plain per-layer LRU cache, the reference for stack distances."""
    hits = 0
    for l in range(trace.n_layers):
        cache: list[int] = []
        for t in range(trace.n_tokens):
            for e in trace.expert_ids[t, l].tolist():
                if e in cache:
                    hits += 1
                    cache.remove(e)
                elif len(cache) == capacity:
                    cache.pop(0)
                cache.append(e)
    return hits


def test_lru_hit_rate_equals_reference_lru():
    meta = TraceMeta(model="s", n_layers=3, n_experts=16, top_k=3, expert_bytes=0, dtype="x", source="s")
    t = synth_trace(meta, 150, SynthKnobs(skew=1.0, locality=0.3, correlation=0.3), seed=5)
    s = compute_stats(t)
    total = t.n_tokens * t.n_layers * t.top_k
    for cap, rate in s.lru_hit_rate.items():
        assert rate == round(_lru_hits(t, int(cap)) / total, 4)


SYN = TraceMeta(model="s", n_layers=6, n_experts=16, top_k=2, expert_bytes=0, dtype="x", source="s")


def test_synth_is_deterministic_and_valid():
    k = SynthKnobs(skew=0.8, locality=0.4, correlation=0.5)
    a, b = synth_trace(SYN, 200, k, seed=1, seq_len=50), synth_trace(SYN, 200, k, seed=1, seq_len=50)
    np.testing.assert_array_equal(a.expert_ids, b.expert_ids)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert not np.array_equal(a.expert_ids, synth_trace(SYN, 200, k, seed=2, seq_len=50).expert_ids)
    assert a.sequences() == [(i, 50 * i, 50 * i + 50) for i in range(4)]
    assert np.all(np.diff(a.weights, axis=-1) <= 0)
    np.testing.assert_allclose(a.weights.sum(-1), 1, rtol=1e-5)
    with pytest.raises(MoeError, match="locality must be in"):
        SynthKnobs(locality=1.5)


def test_each_knob_moves_its_statistic():
    base = headline(synth_trace(SYN, 400, SynthKnobs(), seed=0))
    assert headline(synth_trace(SYN, 400, SynthKnobs(skew=1.5), seed=0))["entropy_norm"] < base["entropy_norm"] - 0.1
    assert headline(synth_trace(SYN, 400, SynthKnobs(locality=0.7), seed=0))["overlap"] > base["overlap"] + 0.4
    assert (headline(synth_trace(SYN, 400, SynthKnobs(correlation=0.9), seed=0))["cross_layer_recall"]
            > base["cross_layer_recall"] + 0.4)


def test_fit_knobs_recovers_a_synthetic_target():
    truth = SynthKnobs(skew=1.2, locality=0.5, correlation=0.6)
    real = synth_trace(SYN, 300, truth, seed=11, seq_len=300)
    fitted = fit_knobs(real, seed=0, fit_tokens=300)
    assert abs(fitted.skew - truth.skew) < 0.3
    assert abs(fitted.locality - truth.locality) < 0.1
    assert abs(fitted.correlation - truth.correlation) < 0.15
    target, got = headline(real), headline(synth_trace(SYN, 300, fitted, seed=0))
    untuned = headline(synth_trace(SYN, 300, SynthKnobs(), seed=0))
    for stat in target:
        assert abs(got[stat] - target[stat]) < abs(untuned[stat] - target[stat])
