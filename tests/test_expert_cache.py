"""ExpertCache bookkeeping: counts, pinning, prefetch admission, against plain references."""

import random
from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_runtime.core.expert_cache import LOADING, READY, ExpertCache, Outcome, access_sequence
from moe_runtime.core.policies import EVICTION_POLICIES
from cache_reference import access_layer


def _run(cache, steps, complete_misses=True):
    for step in steps:
        cache.begin_step()
        for layer, ids in enumerate(step):
            acc = access_layer(cache, layer, ids)
            for _, slot, outcome in acc.outcomes:
                if outcome != Outcome.HIT and complete_misses:
                    cache.copy_done(slot)
            cache.release_layer()
    return cache.finish()


def _steps(seed, n=150, L=4, E=8, K=2):
    rng = random.Random(seed)
    return [[rng.sample(range(E), K) for _ in range(L)] for _ in range(n)]


def _reference_lru_misses(groups, capacity):
    """Plain LRU over ``groups`` (the keys of one (step, layer) each, in access order); DESIGN pins a
    whole group: no key of the group is evicted to make room for another of it."""
    od, misses = OrderedDict(), 0
    for group in groups:
        for k in group:
            if k in od:
                od.move_to_end(k)
            else:
                misses += 1
                if len(od) == capacity:
                    del od[next(x for x in od if x not in group)]
                od[k] = None
    return misses


def _groups(steps, layer=None):
    return [[(l, e) for e in ids] for step in steps for l, ids in enumerate(step) if layer in (None, l)]


@pytest.mark.parametrize("slots", [2, 5, 12, 32])
def test_lru_matches_reference(slots):
    steps = _steps(1)
    cache = ExpertCache(n_slots=slots, n_moe_layers=4, n_experts=8, experts_per_layer=2, expert_bytes=10)
    stats = _run(cache, steps)
    assert stats.misses == _reference_lru_misses(_groups(steps), slots)
    assert stats.hits + stats.late + stats.misses == stats.accesses == 150 * 4 * 2
    assert stats.bytes_h2d == 10 * stats.misses


def test_full_budget_misses_only_first_use():
    steps = _steps(2)
    cache = ExpertCache(n_slots=32, n_moe_layers=4, n_experts=8, experts_per_layer=2, expert_bytes=1, policy="fifo")
    stats = _run(cache, steps)
    assert stats.misses == len(set(access_sequence(steps)))
    assert stats.evictions == 0


def test_per_layer_scope_splits_budget():
    steps = _steps(3)
    cache = ExpertCache(n_slots=10, n_moe_layers=4, n_experts=8, experts_per_layer=2, expert_bytes=1, scope="per-layer")
    assert cache.pool_size == 2 and cache.n_slots == 8
    stats = _run(cache, steps)
    ref = sum(_reference_lru_misses(_groups(steps, layer), 2) for layer in range(4))
    assert stats.misses == ref


def test_prefetch_used_late_and_wasted():
    cache = ExpertCache(n_slots=6, n_moe_layers=3, n_experts=8, experts_per_layer=2, expert_bytes=1, max_inflight=2)
    cache.begin_step()
    acc = access_layer(cache, 0, [0, 1])
    assert [o for *_, o in acc.outcomes] == [Outcome.MISS, Outcome.MISS]
    issued = cache.prefetch([(1, 2), (1, 3), (2, 4)], layer=0)
    assert [k for k, _ in issued] == [(1, 2), (1, 3)]  # max_inflight caps the third
    for _, slot, _ in acc.outcomes:
        cache.copy_done(slot)
    cache.copy_done(issued[0][1])  # (1, 2) arrives, (1, 3) still loading
    cache.release_layer()
    acc = access_layer(cache, 1, [2, 3])
    assert [o for *_, o in acc.outcomes] == [Outcome.HIT, Outcome.LATE]
    cache.copy_done(issued[1][1])
    cache.release_layer()
    late_prefetch = cache.prefetch([(2, 5)], layer=1)
    acc = access_layer(cache, 2, [6, 7])  # (2, 5) was a wrong guess, still queued: stale
    assert acc.stale == [late_prefetch[0][1]]
    cache.cancel(acc.stale[0])
    stats = cache.finish()
    assert (stats.prefetch_issued, stats.prefetch_used, stats.prefetch_wasted, stats.prefetch_cancelled) == (3, 2, 1, 1)
    assert stats.bytes_h2d == 2 + 2 + 2  # 4 demand misses + 2 completed prefetches; the cancelled one moved nothing


def test_prefetch_never_evicts_pinned_or_loading():
    cache = ExpertCache(n_slots=3, n_moe_layers=2, n_experts=8, experts_per_layer=2, expert_bytes=1, max_inflight=1)
    cache.begin_step()
    acc = access_layer(cache, 0, [0, 1])  # both pinned and loading
    assert cache.prefetch([(1, 5)], layer=0) != []  # the one free slot
    assert cache.prefetch([(1, 6)], layer=0) == []  # nothing evictable: pinned, loading
    for _, slot, _ in acc.outcomes:
        assert cache.state[slot] == LOADING


@settings(max_examples=60, deadline=None)
@given(policy=st.sampled_from(sorted(EVICTION_POLICIES)), slots=st.integers(3, 20),
       scope=st.sampled_from(["global", "per-layer"]), seed=st.integers(0, 10**6),
       inflight=st.integers(1, 3))
def test_no_pinned_or_loading_slot_is_ever_taken(policy, slots, scope, seed, inflight):
    """Random routing, prefetches and copy completions: a pinned or LOADING slot keeps its key."""
    L, E, K = 3, 6, 2
    if scope == "per-layer":
        slots = max(slots, L * (K + inflight))
    rng = random.Random(seed)
    steps = [[rng.sample(range(E), K) for _ in range(L)] for _ in range(25)]
    pop = {(layer, e): rng.random() for layer in range(L) for e in range(E)}
    cache = ExpertCache(n_slots=slots, n_moe_layers=L, n_experts=E, experts_per_layer=K, expert_bytes=1,
                        policy=policy, scope=scope, max_inflight=inflight,
                        future=access_sequence(steps), popularity=pop)
    loading: set[int] = set()
    for step in steps:
        cache.begin_step()
        for layer, ids in enumerate(step):
            before = {s: cache.key_of[s] for s in loading}
            acc = access_layer(cache, layer, ids)
            pinned = {slot: (layer, e) for e, slot, _ in acc.outcomes}
            for s, key in before.items():
                assert cache.key_of[s] == key, "a loading slot was overwritten"
            for e, slot, outcome in acc.outcomes:
                assert cache.key_of[slot] == (layer, e)
                if outcome == Outcome.MISS:
                    loading.add(slot)
            for s in acc.stale:
                if rng.random() < 0.5 and s not in pinned:
                    cache.cancel(s)
                    loading.discard(s)
            plan = [(t, rng.randrange(E)) for t in range(layer + 1, L) for _ in range(2)]
            loading.update(slot for _, slot in cache.prefetch(plan, layer))
            for slot, key in pinned.items():
                assert cache.key_of[slot] == key, "a pinned slot was taken by a prefetch"
            for s in list(loading):  # the compute waits for its own; others complete at random
                if s in pinned or rng.random() < 0.5:
                    cache.copy_done(s)
                    loading.discard(s)
            assert all(cache.state[s] == READY for s in pinned)
            cache.release_layer()
    stats = cache.finish()
    assert stats.hits + stats.late + stats.misses == stats.accesses
    assert stats.prefetch_issued == stats.prefetch_used + stats.prefetch_wasted
