"""Sweeps: grid expansion, results files, resume after an interruption, bad experiment files."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from moe_runtime.core.errors import MoeError
from simulator.sweep import load_experiment, run_experiment

REPO = Path(__file__).resolve().parent.parent
EXP = {"name": "tiny", "trace": str(REPO / "traces/mixtral-8x7b-humaneval.npz"), "tokens": 40,
       "budgets": ["5%", "12%", 3], "evictions": ["lru", "fifo"], "predictors": ["none", "history"],
       "lookaheads": [1, 2], "devices": ["t4"]}


def _write(tmp_path, **over):
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump({**EXP, **over}))
    return p


def test_grid_runs_writes_csv_json_plot_and_resumes(tmp_path, capsys):
    exp, out = _write(tmp_path), tmp_path / "out"
    points = load_experiment(exp).points()
    assert len(points) == 3 * 2 * (1 + 2)  # "none" once, history per lookahead
    assert run_experiment(exp, out=str(out), workers=1) == 0
    doc = json.loads((out / "results.json").read_text())
    rows = {r["key"]: r for r in doc["results"]}
    assert len(rows) == 18 and (out / "tokens_per_s.png").stat().st_size > 10_000
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 18
    bad = rows["t4|global|3|lru|history|1"]  # 3 experts < 2 per layer + 4 in flight
    assert "below the minimum" in bad["error"]
    ok = rows["t4|global|12%|lru|none|1"]
    assert ok["accesses"] == 40 * 32 * 2 and ok["total_s"] >= ok["compute_s"] > 0
    # interrupted run: keep 5 finished points (one marked), lose the rest
    kept = dict(list(rows.items())[:5])
    first = next(iter(kept))
    kept[first]["marker"] = "kept"
    doc["results"] = list(kept.values())
    (out / "results.json").write_text(json.dumps(doc))
    capsys.readouterr()
    run_experiment(exp, out=str(out), workers=1)
    text = capsys.readouterr().out
    assert "resuming: 5 of 18 points already done" in text and "13 points to run" in text
    again = {r["key"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert len(again) == 18 and again[first]["marker"] == "kept"
    assert again["t4|global|12%|lru|none|1"]["total_s"] == ok["total_s"]  # deterministic


def test_parallel_workers_match_serial(tmp_path):
    exp = _write(tmp_path, budgets=["12%"], evictions=["lru"])
    run_experiment(exp, out=str(tmp_path / "a"), workers=1)
    run_experiment(exp, out=str(tmp_path / "b"), workers=2)
    a, b = ({r["key"]: r["total_s"] for r in json.loads((tmp_path / d / "results.json").read_text())["results"]}
            for d in "ab")
    assert a == b and len(a) == 3


def test_results_of_another_experiment_are_refused(tmp_path):
    out = tmp_path / "out"
    run_experiment(_write(tmp_path, budgets=["12%"], evictions=["lru"], predictors=["none"]), out=str(out),
                   workers=1)
    with pytest.raises(MoeError, match="holds results of a different experiment"):
        run_experiment(_write(tmp_path, tokens=41, budgets=["12%"], evictions=["lru"], predictors=["none"]),
                       out=str(out), workers=1)


@pytest.mark.parametrize("over,msg", [
    ({"colour": "red"}, r"unknown field\(s\): colour"),
    ({"evictions": ["mru"]}, "unknown eviction policy 'mru'"),
    ({"predictors": ["gate"]}, "runs only in the executor"),
    ({"budgets": []}, "budgets must be a non-empty list"),
    ({"lookaheads": [0]}, "lookahead must be an integer >= 1"),
])
def test_bad_experiment_files_name_the_problem(tmp_path, over, msg):
    with pytest.raises(MoeError, match=msg):
        load_experiment(_write(tmp_path, **over))


def test_missing_field_and_bad_yaml(tmp_path):
    p = tmp_path / "e.yaml"
    p.write_text("name: x\ntrace: t.npz\n")
    with pytest.raises(MoeError, match=r"e.yaml: missing field\(s\): budgets, evictions, predictors, devices"):
        load_experiment(p)
    p.write_text("name: [x\n")
    with pytest.raises(MoeError, match="not valid YAML"):
        load_experiment(p)
    with pytest.raises(MoeError, match="experiment file not found"):
        load_experiment(tmp_path / "nope.yaml")


def test_quickstart_experiment_is_valid():
    exp = load_experiment(REPO / "configs/experiments/quickstart.yaml")
    assert (REPO / exp.trace).is_file() and len(exp.points()) == 120
