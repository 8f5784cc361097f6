"""`moe-sim plan`: memory arithmetic by hand, refusals with numbers, the choice, and budgets that fit."""

import json

import pytest

from moe_runtime.core.errors import MoeError
from moe_runtime.core.shapes import load_model_spec
from simulator import cli
from simulator.device import load_device
from simulator.plan_inputs import choose_trace
from simulator.plan_search import PLAIN, Planner, Space


def planner(model, device="rtx-4060-8gb", *, tokens=40, batch=1, context=4096, ram=256 * 2**30, memory=None):
    from dataclasses import replace
    spec = load_model_spec(model)
    dev = load_device(device)
    if memory is not None:
        dev = replace(dev, memory_gib=memory)
    trace = choose_trace(spec, trace_path=None, tokens=tokens, batch=batch).trace
    return Planner(spec, dev, trace, batch=batch, context=context, workspace="512MiB", host_profile="ddr5-desktop",
                   host_ram_bytes=ram)


def test_memory_of_a_dense_attention_model_by_hand():
    m = planner("mixtral-8x7b", context=4096, batch=2).memory()
    # attention per layer: q 4096x(32x128) + k, v 4096x(8x128) + o (32x128)x4096; norms 2x4096; router 4096x8
    per_layer = 4096 * 4096 * 2 + 4096 * 1024 * 2 + 2 * 4096 + 4096 * 8
    embed = 2 * 32000 * 4096 + 4096  # input embedding, output head, final norm
    assert m.dense_bytes == (32 * per_layer + embed) * 2 == 3_211_272_192
    # keys and values of 8 KV heads of 128 per layer and position, bf16, 32 layers, 4096 positions, 2 sequences
    assert m.kv_bytes == 2 * 8 * 128 * 2 * 32 * 4096 * 2 == 1_073_741_824
    assert m.workspace_bytes == 512 * 2**20
    assert m.free_for_experts == 8 * 2**30 - 3_211_272_192 - 1_073_741_824 - 512 * 2**20


def test_memory_of_an_mla_model_by_hand():
    m = planner("deepseek-v2-lite", context=4096).memory()
    H, n, qk, rope, v, r = 2048, 16, 192, 64, 128, 512
    attn = H * n * qk + H * (r + rope) + r + r * n * (qk - rope + v) + n * v * H  # q, kv_a, kv norm, kv_b, o
    moe = attn + 3 * H * 2816 + 2 * H + H * 64  # shared experts, norms, router
    dense = attn + 3 * H * 10944 + 2 * H
    assert m.dense_bytes == (26 * moe + dense) * 2 + (2 * 102400 * H + H) * 2 == 2_623_265_792
    assert m.kv_bytes == 27 * (512 + 64) * 2 * 4096 == 127_401_984  # the latent, not 16 heads' keys and values


def test_the_choice_is_the_best_point_simulated():
    p = planner("deepseek-v2-lite", tokens=40)
    space = Space(predictors=(("none", 1), ("history", 1)), evictions=("lru", "lfu"), budget_shares=(1.0, 0.5))
    best = p.search(space)
    assert len(p.rows) >= 3
    assert best["tokens_per_s"] == max(r["tokens_per_s"] for r in p.rows.values())
    assert best["tokens_per_s"] >= p.evaluate(PLAIN)["tokens_per_s"]


def test_a_small_device_memory_yields_a_budget_below_all_experts(tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "--model", "deepseek-v2-lite", "--device", "rtx-4060-8gb", "--device-memory", "5",
                  "--host-ram", "64", "--tokens", "24", "--out", str(out), "--json"])
    assert e.value.code == 0
    r = json.loads(capsys.readouterr().out)
    total = 26 * 64
    slots = int(r["best"]["options"]["budget"])
    assert 0 < slots < total
    free = 5 * 2**30 - 2_623_265_792 - 127_401_984 - 512 * 2**20
    assert r["best"]["n_slots"] <= free // 17_301_504
    assert r["best"]["memory"]["device_bytes"] <= 5 * 2**30
    assert r["best"]["tokens_per_s"] == max(t["tokens_per_s"] for t in r["top"])
    text = out.read_text()
    assert f"budget: '{slots}'" in text and "expected:" in text and "trace: 'bundled: deepseek-v2-lite" in text


@pytest.mark.parametrize("argv, words", [
    (["--device-memory", "2"], ["cannot run on rtx-4060-8gb", "dense weights 2.62 GB", "KV cache 127.40 MB"]),
    (["--context", "1000000"], ["KV cache 31.10 GB", "context 1000000"]),
    (["--host-ram", "16"], ["28.79 GB) do not fit in host RAM", "--disk"]),
])
def test_an_impossible_request_is_refused_with_the_numbers(argv, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "--model", "deepseek-v2-lite", "--device", "rtx-4060-8gb", "--tokens", "24",
                  "--out", str(tmp_path / "p.yaml")] + (["--host-ram", "64"] if "--host-ram" not in argv else []) + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    for w in words:
        assert w in err
    assert not (tmp_path / "p.yaml").exists()


def test_router_predictors_are_modelled_from_measured_quality(tmp_path):
    q = tmp_path / "q.json"
    q.write_text(json.dumps({"recall": {"gate": [0.8, 0.6]}, "precision": {"gate": [0.7, 0.5]}}))
    from simulator.plan_inputs import load_predictor_quality
    p = planner("deepseek-v2-lite", tokens=24)
    p.quality = load_predictor_quality(q)
    from dataclasses import replace
    opts = p.options(replace(PLAIN, predictor="gate", lookahead=2))
    assert (opts.predictor, opts.recall, opts.precision) == ("noisy-oracle", pytest.approx(0.7), pytest.approx(0.6))
    with pytest.raises(MoeError, match="no measured quality of gate at lookahead 3"):
        p.options(replace(PLAIN, predictor="gate", lookahead=3))


def test_experts_beyond_host_ram_are_planned_on_disk_with_a_host_tier_that_fits(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "--model", "deepseek-v2-lite", "--device", "rtx-4060-8gb", "--host-ram", "16", "--disk",
                  "--tokens", "24", "--out", str(tmp_path / "p.yaml"), "--json"])
    assert e.value.code == 0
    best = json.loads(capsys.readouterr().out)["best"]
    o = best["options"]
    assert (o["expert_source"], o["miss_policy"]) == ("disk", "copy")
    host = int(o["host_budget"]) * 17_301_504
    assert host == best["memory"]["host_experts_bytes"] <= 0.9 * 16 * 2**30 < host + 17_301_504


def test_latency_is_one_sequence(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "--model", "mixtral-8x7b", "--device", "t4", "--objective", "latency", "--batch", "2",
                  "--out", str(tmp_path / "p.yaml")])
    assert e.value.code == 2 and "--objective latency is seconds per token of one sequence" in capsys.readouterr().err


def test_latency_table_shows_the_bound_in_ms_per_token(tmp_path, capsys):
    """Under --objective latency both columns are ms per token: the bound is a floor below each prediction."""
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "--model", "deepseek-v2-lite", "--device", "rtx-4060-8gb", "--host-ram", "64",
                  "--objective", "latency", "--tokens", "24", "--out", str(tmp_path / "p.yaml")])
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(i for i, l in enumerate(lines) if "ms/token" in l and "bound" in l)
    rows = [l.split() for l in lines[head + 1:] if l.split() and l.split()[0].isdigit()]
    assert rows
    for row in rows:
        ms, bound = float(row[1]), float(row[2])
        assert 0 < bound <= ms + 0.01, row
