"""Hybrid execution and budgets that fit (issue 20): the memory sum, the fit spelling and its refusal, the
protocol's cost rule, the miss policies' counts, host layers and fills (docs/design.md)."""

import json
from pathlib import Path

import pytest
import yaml

from moe_runtime.core.budget import parse_budget
from moe_runtime.core.errors import MoeError
from moe_runtime.core.expert_cache import ExpertCache, Outcome
from moe_runtime.core.memory import DoesNotFit, dense_weight_bytes, kv_cache_bytes, memory_plan
from moe_runtime.core.protocol import HostCost, LayerProtocol
from moe_runtime.core.shapes import ModelSpec, load_model_spec
from simulator.copies import AnalyticCopies
from simulator.cost_model import CostModel
from simulator.device import load_device
from simulator.replay import Replay, ReplayOptions, load_inputs

REPO = Path(__file__).resolve().parent.parent
LAW = str(REPO / "traces/deepseek-v2-lite-law.npz")


def tiny(**kw):
    return ModelSpec(name="tiny", n_layers=2, moe_layers=(0, 1), n_experts=4, top_k=2, hidden_size=8,
                     moe_intermediate_size=4, n_heads=2, n_kv_heads=1, head_dim=4, vocab_size=10, dtype="float32",
                     **kw)


def test_memory_of_a_dense_attention_model_by_hand():
    s = tiny()
    # attention 8*2*4*2 + 8*1*4*2 = 192, norms 16, router 32 -> 240 per layer, x2; embeddings 2*10*8 + 8 = 168
    assert dense_weight_bytes(s) == (2 * 240 + 168) * 4 == 2592
    # keys and values of one KV head of 4, fp32: 32 bytes per position and layer
    assert kv_cache_bytes(s, context=5, batch=3) == 3 * 5 * 2 * 32
    slid = tiny(sliding_window=2, sliding_layers=(0,))  # layer 0 keeps 2 positions
    assert kv_cache_bytes(slid, context=5, batch=3) == 3 * (2 + 5) * 32
    p = memory_plan(s, device_name="d", device_bytes=10_000, context=5, batch=3, workspace_bytes=1000)
    assert p.free_for_experts == 10_000 - 2592 - 960 - 1000
    p.check(p.free_for_experts, "all")
    with pytest.raises(DoesNotFit, match=r"dense weights .* \+ KV cache .* \+ workspace .* > device memory"):
        p.check(p.free_for_experts + 1, "too much")


def test_memory_of_latent_attention_by_hand():
    s = load_model_spec("deepseek-v2-lite")
    # q 2048*16*192, kv_a 2048*(512+64), its norm 512, kv_b 512*16*(128+128), o 16*128*2048
    assert s.attention_weight_params == 6_291_456 + 1_179_648 + 512 + 2_097_152 + 4_194_304
    # the latent: (512 + 64) bf16 values per position, 27 layers
    assert kv_cache_bytes(s, context=4096, batch=2) == 2 * 4096 * 27 * 576 * 2
    gpt = load_model_spec("gpt-oss-20b")  # 12 of 24 layers keep 128 positions
    assert kv_cache_bytes(gpt, context=1000, batch=1) == (12 * 128 + 12 * 1000) * 2 * 8 * 64 * 2
    with pytest.raises(MoeError, match="kv_lora_rank and qk_rope_head_dim"):
        tiny(kv_lora_rank=8)
    with pytest.raises(MoeError, match="sliding_window and sliding_layers"):
        tiny(sliding_window=8)


def test_fit_budgets_share_what_is_left():
    assert parse_budget("fit", expert_bytes=100, total_experts=50, free_bytes=2_050) == 20
    assert parse_budget("fit:50%", expert_bytes=100, total_experts=50, free_bytes=2_050) == 10
    assert parse_budget("fit", expert_bytes=100, total_experts=5, free_bytes=2_050) == 5  # capped at all experts
    with pytest.raises(MoeError, match="needs the device's memory"):
        parse_budget("fit", expert_bytes=100, total_experts=50)
    trace, spec = load_inputs(LAW, None, 5)
    rep = Replay(trace, CostModel(spec, load_device("rtx-4060-8gb")), ReplayOptions(budget="fit"), fit_check=True).run()
    assert rep["n_slots"] == rep["memory"]["free_for_experts"] // spec.expert_bytes == 306


def _sim(capsys, *argv):
    from simulator.cli import main
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_a_budget_that_does_not_fit_is_refused_in_one_line(capsys, tmp_path):
    code, _, err = _sim(capsys, "replay", "--trace", LAW, "--device", "rtx-4060-8gb", "--tokens", "5",
                        "--expert-budget", "25%")
    assert code == 2 and err.count("\n") == 1
    assert "dense weights 2.62 GB + KV cache 0.13 GB (context 4096 x batch 1) + workspace 0.54 GB + experts " \
           "7.20 GB" in err and "device memory 8.59 GB" in err
    exp = tmp_path / "e.yaml"
    exp.write_text(yaml.safe_dump({"name": "nofit", "trace": LAW, "tokens": 5, "budgets": ["10%", "25%"],
                                   "evictions": ["lru"], "predictors": ["none"], "devices": ["rtx-4060-8gb"],
                                   "out": str(tmp_path / "out")}))
    code, _, err = _sim(capsys, "sweep", exp, "--workers", "1")
    assert code == 2 and err.count("\n") == 1 and "rtx-4060-8gb|global|25%" in err and "does not fit" in err
    assert not (tmp_path / "out" / "results.json").exists()  # refused before any point ran


class Link:
    """A link with a fixed demand backlog that records what it is told."""

    def __init__(self, backlog=0.0):
        self.backlog, self.demands, self.fills = backlog, [], []

    def withdraw(self, slot):
        return False

    def demand(self, slot, key):
        self.demands.append(key)

    def promote(self, slot):
        pass

    def prefetch(self, slot, key):
        pass

    def backlog_s(self):
        return self.backlog

    def ready_in_s(self, slot):
        return None

    def fill(self, slot, key):
        self.fills.append(key)


COST = HostCost(host_s=lambda n: 0.5e-3 * n, copy_s=1.4e-3, device_s=lambda n: 0.02e-3 * n)


def _layer(counts, backlog=0.0, policy="auto"):
    cache = ExpertCache(n_slots=8, n_moe_layers=2, n_experts=8, experts_per_layer=2, expert_bytes=10)
    link = Link(backlog)
    proto = LayerProtocol(cache, link, miss_policy=policy, host_cost=COST)
    proto.begin_step()
    proto.layer(0, [3, 5], counts=counts)
    return [o for *_, o in proto.in_use], link, cache, proto


def test_the_cost_rule_host_at_one_token_copy_at_many():
    outcomes, link, cache, proto = _layer([1, 1])  # host 0.5 ms, then 1.0 ms < a copy's 1.42 ms
    assert outcomes == [Outcome.HOST, Outcome.HOST] and link.demands == [] and cache.stats.host_computed == 2
    assert proto.host_seconds == pytest.approx(1.0e-3)
    outcomes, link, cache, _ = _layer([64, 64])  # host 32 ms > copy 1.4 ms + device 1.3 ms, both times
    assert outcomes == [Outcome.MISS, Outcome.MISS] and link.demands == [(0, 3), (0, 5)]
    outcomes, link, _, _ = _layer([4, 4])  # host 2 ms vs 1.48 ms: copy; then host 2 ms < 2.88 ms: host
    assert outcomes == [Outcome.MISS, Outcome.HOST] and link.demands == [(0, 3)]
    outcomes, link, _, _ = _layer([64, 64], backlog=0.1)  # a busy link: the host wins even at 64 tokens
    assert outcomes == [Outcome.HOST, Outcome.HOST]
    outcomes, link, _, _ = _layer([64, 64], policy="host")
    assert outcomes == [Outcome.HOST, Outcome.HOST] and link.demands == []


def test_auto_fills_host_computed_misses_and_they_take_slots():
    _, link, cache, _ = _layer([1, 1])
    assert link.fills == [(0, 3), (0, 5)] and cache.stats.fills == 2 and set(cache.slot_of) == {(0, 3), (0, 5)}
    assert cache.stats.bytes_h2d == 20  # the fills' bytes; the host-computed misses copied nothing


def test_a_fill_uses_only_idle_link_time_and_never_delays_a_demand():
    cache = ExpertCache(n_slots=8, n_moe_layers=2, n_experts=8, experts_per_layer=2, expert_bytes=10)
    link = AnalyticCopies(cache, engines=1, copy_s=1.0)
    link.begin_layer(0.0)
    fill_slot = cache.fill((0, 1), 0)
    link.fill(fill_slot, (0, 1))
    link.begin_layer(0.5)  # half the fill copied in the idle time
    slot = cache.fill((0, 2), 0)  # a slot for a demand (the bookkeeping is the cache's; timing is asserted)
    link.demand(slot, (0, 2))
    assert link.finish[slot] == 1.5  # started at once, as on an idle link
    link.begin_layer(1.5)
    assert cache.state[slot] == 2 and cache.state[fill_slot] == 1  # the fill waited, paused
    link.begin_layer(2.0)
    assert cache.state[fill_slot] == 2  # its second half ran once the link was idle again


def _replay(policy, tokens=120, budget="10%", **kw):
    trace, spec = load_inputs(LAW, None, tokens)
    r = Replay(trace, CostModel(spec, load_device("rtx-4060-8gb")),
               ReplayOptions(budget=budget, miss_policy=policy, **kw), fit_check=True)
    return r, r.run()


def test_host_policy_copies_nothing_and_computes_every_miss():
    _, rep = _replay("host", predictor="none")
    assert rep["bytes_h2d"] == 0 and rep["fills"] == 0 and rep["stall_s"] == 0
    assert rep["host_computed"] == rep["accesses"] - rep["hits"] > 0 and rep["host_s"] > 0


def test_copy_keeps_the_counts_of_before():
    _, a = _replay("copy", predictor="history", lookahead=2)
    _, b = _replay(None, predictor="history", lookahead=2)  # options built in code: copy, as before
    for k in ("hits", "late", "misses", "bytes_h2d", "total_s", "prefetch_issued"):
        assert a[k] == b[k], k
    assert a["host_computed"] == a["fills"] == 0 and a["miss_policy"] == "copy"


def test_host_layers_never_take_slots():
    r, rep = _replay("auto", predictor="oracle", lookahead=2, n_host_layers=3, host_layers="7")
    assert rep["host_layers"] == [0, 1, 2, 7]
    assert not [k for k in r.cache.slot_of if k[0] in (0, 1, 2, 7)]
    for layer in (0, 1, 2, 7):
        assert rep["per_layer"]["hits"][layer] == 0 and rep["per_layer"]["misses"][layer] == 120 * 6


def test_auto_at_batch_one_beats_copy_only_twice_on_a_desktop():
    _, copy = _replay("copy")
    _, auto = _replay("auto")
    _, host = _replay("host")
    assert auto["tokens_per_s"] >= 2 * copy["tokens_per_s"]
    assert auto["tokens_per_s"] >= 0.98 * max(copy["tokens_per_s"], host["tokens_per_s"])
    assert auto["bounds"]["best_hybrid_tokens_per_s"] >= auto["tokens_per_s"]


@pytest.mark.parametrize("family", ["deepseek_v2", "gpt_oss"])
def test_checkpoint_configs_carry_mla_ranks_and_sliding_layers(family, tmp_path):
    from tiny_checkpoints import make_tiny_checkpoint
    d = json.loads((make_tiny_checkpoint(family, tmp_path / family) / "config.json").read_text())
    spec = ModelSpec.from_hf_config(d, name=family)
    if family == "deepseek_v2":
        assert (spec.kv_lora_rank, spec.qk_rope_head_dim) == (d["kv_lora_rank"], d["qk_rope_head_dim"]) != (0, 0)
        assert spec.head_dim == d["qk_nope_head_dim"] + d["qk_rope_head_dim"]
        assert spec.kv_bytes_per_position == (d["kv_lora_rank"] + d["qk_rope_head_dim"]) * spec.dtype_bytes
    else:
        assert spec.sliding_window == d["sliding_window"] and spec.sliding_layers == tuple(
            i for i, t in enumerate(d["layer_types"]) if t == "sliding_attention") != ()
