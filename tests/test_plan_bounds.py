"""`moe-sim plan`: the RAM check per expert format, the reasons of a search that finds nothing, and a bound
column that bounds the tokens/s beside it (the hybrid floor for rows that compute on the host)."""

import json

import numpy as np
import pytest
from test_plan import planner

from moe_runtime.core.errors import MoeError
from moe_runtime.core.shapes import load_model_spec
from simulator import cli
from simulator.cost_model import CostModel
from simulator.device import load_device
from simulator.plan_search import Space

INT4_TOTAL = 26 * 64 * 4_866_048  # deepseek-v2-lite's routed experts in int4 (8.10 GB); bf16 is 28.79 GB


def _plan(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "--model", "deepseek-v2-lite", "--device", "rtx-4060-8gb", "--tokens", "24", *argv])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_only_int4_fits_host_ram_then_int4_is_planned(tmp_path, capsys):
    spec = load_model_spec("deepseek-v2-lite").with_expert_dtype("int4")
    assert spec.total_expert_bytes == INT4_TOTAL < 0.9 * 12 * 2**30 < 28.79e9
    code, _, err = _plan(capsys, "--host-ram", "12", "--out", str(tmp_path / "p.yaml"))
    assert code == 2 and "do not fit in host RAM" in err and "--allow-dtype int4" in err
    code, out, err = _plan(capsys, "--host-ram", "12", "--allow-dtype", "int4", "--json",
                           "--out", str(tmp_path / "p.yaml"))
    assert code == 0, err
    r = json.loads(out)
    assert r["best"]["options"]["expert_dtype"] == "int4" and r["default"]["options"]["expert_dtype"] == "int4"
    assert r["best"]["memory"]["host_experts_bytes"] == INT4_TOTAL
    assert all(t["options"]["expert_dtype"] == "int4" for t in r["top"])


def test_int4_beyond_host_ram_too_is_refused_without_suggesting_int4_again(tmp_path, capsys):
    code, _, err = _plan(capsys, "--host-ram", "8", "--allow-dtype", "int4", "--out", str(tmp_path / "p.yaml"))
    assert code == 2 and err.count("\n") == 1
    assert "experts (8.10 GB in int4) do not fit in host RAM" in err and "--allow-dtype" not in err


def test_every_printed_bound_bounds_its_tokens_per_s(tmp_path, capsys):
    code, out, err = _plan(capsys, "--host-ram", "64", "--allow-dtype", "int4", "--json",
                           "--out", str(tmp_path / "p.yaml"))
    assert code == 0, err
    r = json.loads(out)
    rows = r["top"] + [r["best"], r["default"]]
    assert any(t["options"]["miss_policy"] != "copy" for t in rows)  # host-computing rows are among them
    for t in rows:
        assert t["bound_tokens_per_s"] >= t["tokens_per_s"] * (1 - 1e-9), t["config"]


def test_the_bound_of_every_simulated_point_holds_at_batch_4():
    p = planner("mixtral-8x7b", "t4", tokens=48, batch=4)
    space = Space(predictors=(("none", 1), ("history", 1)), evictions=("lru",), scopes=("global",),
                  budget_shares=(1.0, 0.5), n_host_layers=(0, 8), expert_dtypes=(None, "int4"))
    p.run_all(space)
    assert len(p.rows) >= 20 and any(r["host_computed"] for r in p.rows.values())
    for r in p.rows.values():
        assert r["bound_tokens_per_s"] >= r["tokens_per_s"] * (1 - 1e-9), r["point"]
        assert p.bound(r["point"]) == pytest.approx(r["bound_tokens_per_s"])


def test_hybrid_floor_by_hand():
    cost = CostModel(load_model_spec("mixtral-8x7b"), load_device("t4"))
    s, one = cost.spec, cost.expert_seconds(1)
    # one step, one layer, two experts of one token; the host takes 0.4 or 3 device-expert times per expert
    full = float(cost.scale * cost._roofline(cost._moe_flops(1, 10), cost._moe_bytes(1, 10, 2)))
    without = [float(cost.scale * cost._roofline(cost._moe_flops(1, 10) - k * s.expert_flops_per_token,
                                                 cost._moe_bytes(1, 10, 2 - k))) for k in (1, 2)]
    head = float(cost.scale * cost._overhead(np.array([1.0]), np.array([10.0]))[0])
    for h in (0.4 * one, 3 * one):
        want = min(full, max(without[0], h), max(without[1], 2 * h)) + head
        got = cost.hybrid_floor_s([1], [10], np.array([[2]]), None, lambda n, h=h: h)
        assert got == pytest.approx(want)
    assert cost.hybrid_floor_s([1], [10], np.array([[2]]), None, lambda n: 1e9) == pytest.approx(full + head)


def test_a_search_where_nothing_runs_says_why():
    p = planner("deepseek-v2-lite", tokens=24, ram=8 * 2**30)  # bf16 experts (28.79 GB) beyond the RAM
    with pytest.raises(MoeError, match=r"no configuration of the search space can run here: the experts do not "
                                       r"fit in host RAM \(2 points\)"):
        p.search(Space())
