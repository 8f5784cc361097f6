"""`moe-trace` commands: outputs on bundled traces, one-line errors with exit status 2."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_runtime.traces import load_trace
from moe_runtime.cli.trace import main

REPO = Path(__file__).resolve().parents[1]
HUMANEVAL = REPO / "traces" / "mixtral-8x7b-humaneval.npz"
VLLM = Path("/work/shared/data/mixtral-8x7b-vllm")


def run(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_info_json_on_bundled_trace(capsys):
    code, out, _ = run(capsys, "info", HUMANEVAL, "--json")
    i = json.loads(out)
    assert code == 0
    assert (i["tokens"], i["layers"], i["experts"], i["top_k"], i["sequences"]) == (333, 32, 8, 2, 2)
    assert i["expert_bytes"] == 352_321_536 and i["phases"] == {"prefill": 0, "decode": 333}
    assert i["extra"]["dropped_tokens"] == 5
    code, out, _ = run(capsys, "info", HUMANEVAL)
    assert "333 tokens x 32 MoE layers x top-2 of 8 experts" in out


def test_stats_json(capsys):
    code, out, _ = run(capsys, "stats", HUMANEVAL, "--json")
    s = json.loads(out)
    assert code == 0 and s["tokens"] == 333 and len(s["per_layer"]["overlap"]) == 32
    assert 0.9 < s["summary"]["entropy_norm"] <= 1 and s["summary"]["overlap"] > s["chance_overlap"]
    assert set(s["reuse"]["lru_hit_rate_per_layer_cache"]) == {"2", "4"}
    code, out, _ = run(capsys, "stats", HUMANEVAL, "--no-reuse")
    assert "cross-layer recall" in out and "reuse" not in out


@pytest.mark.skipif(not VLLM.is_dir(), reason="shared/data not present")
def test_import_json_and_round_trip(capsys, tmp_path):
    out_file = tmp_path / "g.npz"
    code, out, _ = run(capsys, "import", VLLM / "gsm8k_2_routing.jsonl", "--model", "mixtral-8x7b",
                       "--out", out_file, "--json", "--source", "unit test")
    r = json.loads(out)
    assert code == 0 and (r["tokens"], r["dropped_tokens"], r["out"]) == (244, 3, str(out_file))
    t = load_trace(out_file)
    assert t.meta.source == "unit test" and t.meta.extra["imported_from"] == "gsm8k_2_routing.jsonl"


def test_synth_deterministic_and_like(capsys, tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    flags = ["--layers", 4, "--experts", 8, "--top-k", 2, "--tokens", 100, "--skew", 1, "--locality", 0.5,
             "--seed", 7]
    assert run(capsys, "synth", "--out", a, *flags)[0] == 0
    assert run(capsys, "synth", "--out", b, *flags)[0] == 0
    np.testing.assert_array_equal(load_trace(a).expert_ids, load_trace(b).expert_ids)
    code, out, _ = run(capsys, "synth", "--like", HUMANEVAL, "--out", tmp_path / "l.npz", "--json")
    fit = json.loads(out)["fit"]
    assert code == 0 and load_trace(tmp_path / "l.npz").n_tokens == 333
    for stat, row in fit.items():  # the fitted trace is closer to the real one than untuned knobs
        assert abs(row["synth"] - row["real"]) < abs(row["untuned"] - row["real"]), stat
        assert abs(row["synth"] - row["real"]) < 0.03, stat
    code, out, _ = run(capsys, "synth", "--model", "olmoe-1b-7b", "--tokens", 20, "--out", tmp_path / "m.npz")
    assert code == 0 and load_trace(tmp_path / "m.npz").meta.expert_bytes == 25_165_824


def test_errors_are_one_line_exit_2(capsys, tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    cases = [
        (["info", tmp_path / "absent.npz"], "trace file not found"),
        (["info", tmp_path / "junk.npz"], "not a trace file"),
        (["stats", tmp_path / "junk.npz"], "not a trace file"),
        (["import", HUMANEVAL, "--model", "mixtral-8x7b", "--out", tmp_path / "x.npz"], "already a moe-offload trace"),
        (["import", tmp_path / "junk.npz", "--model", "nope", "--out", tmp_path / "x.npz"], "unknown model 'nope'"),
        (["synth", "--out", tmp_path / "s.npz"], "give --model, --like, or all of"),
        (["synth", "--out", tmp_path / "s.npz", "--model", "mixtral-8x7b", "--experts", 4], "--experts 4 contradicts"),
        (["synth", "--out", tmp_path / "s.npz", "--like", HUMANEVAL, "--skew", 1], "--like fits the knobs"),
        (["synth", "--out", tmp_path / "s.npz", "--model", "mixtral-8x7b", "--locality", 2], "--locality: must be a number >= 0 and <= 1"),
        (["synth", "--out", tmp_path / "s.npz", "--model", "mixtral-8x7b", "--tokens", 0], "--tokens: must be an integer >= 1"),
        # a missing folder is created (issue 10); one under a regular file cannot be
        (["synth", "--out", tmp_path / "junk.npz" / "s.npz", "--model", "mixtral-8x7b"], "is a file, not a directory"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2, argv
        assert err.startswith("moe-trace: error: ") and message in err and err.count("\n") == 1, err


def test_console_script_prints_no_traceback(tmp_path):
    (tmp_path / "t.npz").write_bytes(b"PK\x03\x04 truncated zip")
    p = subprocess.run([sys.executable, "-m", "moe_runtime.cli.trace", "info", str(tmp_path / "t.npz")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith("moe-trace: error: ") and "t.npz" in p.stderr
