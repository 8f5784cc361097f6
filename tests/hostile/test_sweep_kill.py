"""A sweep killed with SIGKILL part-way resumes to the rows of an uninterrupted run, leaving no temp files."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import yaml

from moe_runtime.core.outputs import TMP_PREFIX
from simulator.sweep import run_experiment

from .conftest import LAW, REPO, _bounded

WALL = {"wall_s", "accesses_per_wall_s"}  # wall-clock columns differ between runs by nature


def _rows(out) -> dict:
    doc = json.loads((out / "results.json").read_text())
    rows = {}
    for r in doc["results"]:
        r = {k: v for k, v in r.items() if k not in WALL}
        if "report" in r:
            r["report"] = {k: v for k, v in r["report"].items() if k not in WALL}
        rows[r["key"]] = r
    return rows


def _csv(out) -> list:
    with open(out / "results.csv") as f:
        return sorted(tuple(v for k, v in r.items() if k not in WALL) for r in csv.DictReader(f))


def test_killed_sweep_resumes_to_the_same_rows(tmp_path, capsys):
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({"name": "kill", "trace": LAW, "tokens": 150, "budgets": ["10%", "25%", "40%"],
                                   "evictions": ["lru", "fifo"], "predictors": ["none"], "devices": ["t4"]}))
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    run_experiment(exp, out=str(ref), workers=1)
    total = len(_rows(ref))
    assert total == 6

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-m", "simulator.cli", "sweep", str(exp), "--out", str(killed),
                          "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
                         env=env, preexec_fn=_bounded)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and p.poll() is None:
            journal = killed / "results.jsonl"  # one line per finished point, after the header
            if journal.exists() and journal.read_text().count("\n") >= 2:
                break
            time.sleep(0.005)
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(timeout=30)
    done = journal.read_text().count("\n") - 1
    assert p.returncode == -signal.SIGKILL and 0 < done < total, (p.returncode, done)
    # a write cut short by the kill leaves a temp file; make sure there is one, from a process now gone
    (killed / f"{TMP_PREFIX}{p.pid}-results.json-x1y2").write_text('{"half": ')

    capsys.readouterr()
    run_experiment(exp, out=str(killed), workers=1)
    text = capsys.readouterr().out
    assert f"resuming: {done} of {total} points already done" in text and "temporary file" in text
    assert _rows(killed) == _rows(ref) and _csv(killed) == _csv(ref)
    assert not [n for n in os.listdir(killed) if n.startswith(TMP_PREFIX) or n.endswith(".tmp")]
    assert sorted(os.listdir(killed)) == sorted(os.listdir(ref)) == ["results.csv", "results.json",
                                                                    "tokens_per_s.png"]
