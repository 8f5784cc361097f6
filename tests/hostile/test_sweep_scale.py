"""Classes 2, 3 (Ray) and 8 of issue 24: a sweep writes O(1) per point, says its size first, refuses huge grids,
caps its workers, locks its folder, validates what it resumes from, and ends on Ctrl-C with one line."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time

import yaml

from simulator import sweep_store
from simulator.sweep import run_experiment

from .conftest import LAW, REPO, _bounded, assert_one_error


def _exp(tmp_path, name="scale", n_budgets=3, **over):
    p = tmp_path / f"{name}-{n_budgets}.yaml"
    d = {"name": name, "trace": LAW, "tokens": 2, "budgets": [f"{(10 + i) / 4:g}%" for i in range(n_budgets)],  # all fit a t4
         "evictions": ["lru"], "predictors": ["none"], "devices": ["t4"], **over}
    p.write_text(yaml.safe_dump(d))
    return p


def _count_writes(monkeypatch, tmp_path, n_budgets) -> tuple[int, int]:
    """(whole-file writes, journal appends) of a sweep of ``n_budgets`` points."""
    files, lines = [], []
    real_json, real_text, real_write = sweep_store.write_json_atomic, sweep_store.write_text_atomic, os.write
    monkeypatch.setattr(sweep_store, "write_json_atomic", lambda p, o, **k: (files.append(p), real_json(p, o, **k)))
    monkeypatch.setattr(sweep_store, "write_text_atomic", lambda p, t: (files.append(p), real_text(p, t)))
    monkeypatch.setattr(os, "write", lambda fd, b: (lines.append(b) if b.startswith(b'{"key"') else None,
                                                   real_write(fd, b))[1])
    assert run_experiment(_exp(tmp_path, n_budgets=n_budgets), out=str(tmp_path / f"o{n_budgets}"), workers=1) == 0
    monkeypatch.undo()
    return len(files), len(lines)


def test_a_finished_point_is_one_appended_line(tmp_path, monkeypatch, capsys):
    small, large = _count_writes(monkeypatch, tmp_path, 4), _count_writes(monkeypatch, tmp_path, 16)
    assert small[0] == large[0] == 2  # results.json and results.csv, once, at the end
    assert (small[1], large[1]) == (4, 16)  # one journal line per point
    rows = json.loads((tmp_path / "o16" / "results.json").read_text())["results"]
    assert len(rows) == 16 and not (tmp_path / "o16" / "results.jsonl").exists()


def test_grid_size_and_estimate_are_printed_first(sim, tmp_path):
    code, out, err = sim("sweep", _exp(tmp_path), "--out", tmp_path / "o", "--workers", 1000)
    assert code == 0, err
    used = int(re.search(r"--workers 1000: using (\d+) \(3 points to run, (\d+) CPUs\)", out).group(1))
    assert 1 <= used <= min(3, os.cpu_count())
    assert f"grid of 3 points, 3 points to run on {used} worker(s), about" in out and "(first point" in out


def test_huge_grids_are_refused_fast_unless_raised(sim, tmp_path):
    big = _exp(tmp_path, n_budgets=1, budgets=list(range(100, 1100)), predictors=["history", "oracle"], lookaheads=list(range(1, 12)),
               evictions=["lru", "fifo", "lfu", "belady", "static"])
    t0 = time.monotonic()
    code, out, err = sim("sweep", big, "--out", tmp_path / "o")
    assert_one_error(code, err, "moe-sim", "110,000 points", "limit of 100,000", "--max-points")
    assert time.monotonic() - t0 < 10 and not (tmp_path / "o").exists()
    code, _, err = sim("sweep", _exp(tmp_path), "--out", tmp_path / "o", "--max-points", 2)
    assert_one_error(code, err, "moe-sim", "grid has 3 points", "limit of 2")
    assert sim("sweep", _exp(tmp_path), "--out", tmp_path / "o", "--max-points", 3)[0] == 0


def test_a_folder_in_use_is_refused_and_another_experiment_too(sim, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running sweep holds it
        code, _, err = sim("sweep", _exp(tmp_path), "--out", out)
        assert_one_error(code, err, "moe-sim", "in use by another sweep")
    finally:
        os.close(fd)
    assert sim("sweep", _exp(tmp_path), "--out", out)[0] == 0
    code, out_text, err = sim("sweep", _exp(tmp_path), "--out", out)  # the same experiment: resumes
    assert code == 0 and "resuming: 3 of 3 points" in out_text
    code, _, err = sim("sweep", _exp(tmp_path, name="other"), "--out", out)
    assert_one_error(code, err, "moe-sim", "different experiment ('scale')")


def test_resume_rebuilds_the_csv_and_validates_rows(sim, tmp_path):
    exp, out = _exp(tmp_path), tmp_path / "o"
    assert sim("sweep", exp, "--out", out)[0] == 0
    csv_text = (out / "results.csv").read_text()
    (out / "results.csv").unlink()
    assert sim("sweep", exp, "--out", out)[0] == 0
    assert (out / "results.csv").read_text() == csv_text
    doc = json.loads((out / "results.json").read_text())
    for field, value in (("tokens_per_s", -1.0), ("hits", -3), ("lookahead", 0), ("budget_fraction", 1e400)):
        bad = json.loads(json.dumps(doc))
        bad["results"][0][field] = value
        (out / "results.json").write_text(json.dumps(bad))
        code, _, err = sim("sweep", exp, "--out", out)
        assert_one_error(code, err, "moe-sim", "results.json", "not a sweep result", field)
    (out / "results.json").write_text(json.dumps(doc))


def test_a_journal_cut_short_resumes_and_a_forged_one_is_refused(sim, tmp_path):
    exp, out = _exp(tmp_path), tmp_path / "o"
    assert sim("sweep", exp, "--out", out)[0] == 0
    doc = json.loads((out / "results.json").read_text())
    rows = doc["results"]
    (out / "results.json").unlink()
    head = json.dumps({"fingerprint": doc["fingerprint"], "name": "scale"})
    (out / "results.jsonl").write_text(head + "\n" + json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:20])
    code, text, err = sim("sweep", exp, "--out", out)  # as after SIGKILL mid-line: 1 kept, 2 run again
    assert code == 0 and "resuming: 1 of 3 points" in text, err
    (out / "results.json").unlink()
    forged = {**rows[0], "misses": "many"}
    (out / "results.jsonl").write_text(head + "\n" + json.dumps(forged) + "\n")
    code, _, err = sim("sweep", exp, "--out", out)
    assert_one_error(code, err, "moe-sim", "results.jsonl", "misses")


def test_ctrl_c_during_a_sweep_is_one_line_and_exit_130(tmp_path):
    exp = _exp(tmp_path, n_budgets=40, tokens=300, evictions=["lru", "fifo"])
    out = tmp_path / "o"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-m", "simulator.cli", "sweep", str(exp), "--out", str(out),
                          "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                         env=env, preexec_fn=_bounded, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and p.poll() is None:
            j = out / "results.jsonl"
            if j.exists() and j.read_text().count("\n") >= 3:
                break
            time.sleep(0.01)
        os.killpg(p.pid, signal.SIGINT)  # as a terminal does: the parent and every pool worker
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    lines = [ln for ln in err.splitlines() if "interrupted" in ln]
    assert len(lines) == 1 and "run the same command again to resume" in lines[0], err


def test_ray_dead_address_fails_fast_with_one_line(sim, tmp_path):
    t0 = time.monotonic()
    code, _, err = sim("sweep", _exp(tmp_path), "--out", tmp_path / "o", "--backend", "ray",
                       "--address", "127.0.0.1:1")
    assert_one_error(code, err, "moe-sim", "--address 127.0.0.1:1", "no Ray cluster answered within 5 s")
    assert time.monotonic() - t0 < 10
