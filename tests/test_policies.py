"""Eviction policies on hand-worked sequences: each victim here was worked out by hand."""

import pytest

from moe_runtime.core.errors import MoeError
from moe_runtime.core.policies import EVICTION_POLICIES, make_policy


def _fill(policy, keys):
    for k in keys:
        policy.insert(k)


def test_registry_names():
    assert set(EVICTION_POLICIES) == {"lru", "lfu", "fifo", "layer-cyclic", "static", "belady"}


def test_lru_fifo_lfu_victims():
    keys = [(0, 0), (0, 1), (0, 2)]
    lru = make_policy("lru", n_moe_layers=1, capacity=3, stream_slots=1)
    fifo = make_policy("fifo", n_moe_layers=1, capacity=3, stream_slots=1)
    lfu = make_policy("lfu", n_moe_layers=1, capacity=3, stream_slots=1)
    for p in (lru, fifo, lfu):
        _fill(p, keys)
        for k in [(0, 0), (0, 0), (0, 2), (0, 1)]:
            p.access(k)
    always = lambda k: True  # noqa: E731
    assert lru.victim(always, 0) == (0, 0)  # accesses 0,0,2,1: 0 is least recently used
    assert fifo.victim(always, 0) == (0, 0)  # first in
    assert lfu.victim(always, 0) == (0, 2)  # counts 2,1,1: tie 1 vs 2 broken by LRU -> 2 used earlier than 1
    assert lru.victim(lambda k: k != (0, 0), 0) == (0, 2)


def test_layer_cyclic_evicts_layer_just_computed_first():
    p = make_policy("layer-cyclic", n_moe_layers=4, capacity=4, stream_slots=1)
    _fill(p, [(0, 0), (1, 0), (2, 0), (3, 0)])
    always = lambda k: True  # noqa: E731
    assert p.victim(always, 2) == (1, 0)  # at layer 2, layer 1 is 3 steps ahead cyclically
    assert p.victim(always, 0) == (3, 0)
    assert p.victim(lambda k: k[0] != 1, 2) == (0, 0)  # next furthest ahead: layer 0 (2 ahead)


def test_static_protects_hot_set():
    pop = {(0, 0): 10, (0, 1): 5, (0, 2): 1, (0, 3): 0}
    p = make_policy("static", n_moe_layers=1, capacity=3, stream_slots=1, popularity=pop)
    assert p.hot == {(0, 0), (0, 1)}
    _fill(p, [(0, 0), (0, 1), (0, 2)])
    assert p.victim(lambda k: True, 0) == (0, 2)
    assert p.victim(lambda k: k != (0, 2), 0) == (0, 0)  # only hot ones left: LRU among them


def test_belady_evicts_furthest_next_use():
    future = [(0, 0), (0, 1), (0, 2), (0, 0), (0, 1), (0, 0), (0, 2)]
    p = make_policy("belady", n_moe_layers=1, capacity=2, stream_slots=1, future=future)
    _fill(p, [(0, 0), (0, 1), (0, 2)])
    for k in future[:3]:
        p.access(k)
    # now at position 3: next uses 0->3, 1->4, 2->6
    assert p.victim(lambda k: True, 0) == (0, 2)


@pytest.mark.parametrize("name", ["static", "belady"])
def test_policies_that_need_data_say_so(name):
    with pytest.raises(MoeError, match=name):
        make_policy(name, n_moe_layers=1, capacity=2, stream_slots=1)


def test_unknown_policy():
    with pytest.raises(MoeError, match="unknown eviction policy 'mru'"):
        make_policy("mru", n_moe_layers=1, capacity=2, stream_slots=1)
