"""`moe-sim` command line: JSON report fields, one-line errors (exit 2), timeline file."""

import json
from pathlib import Path

import pytest

from simulator.cli import main

REPO = Path(__file__).resolve().parent.parent
LAW = str(REPO / "traces/deepseek-v2-lite-law.npz")


def _run(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_replay_json_has_the_report_fields(capsys, tmp_path):
    code, out, err = _run(capsys, "replay", "--trace", LAW, "--device", "rtx-4060-8gb", "--budget", "2GiB",
                          "--eviction", "lru", "--predictor", "history", "--lookahead", "2", "--tokens", "60",
                          "--miss-policy", "copy", "--json", "--timeline", str(tmp_path / "tl.json"))
    assert code == 0, err
    rep = json.loads(out)
    for k in ("accesses", "hits", "late", "misses", "prefetch_issued", "prefetch_used", "prefetch_wasted",
              "bytes_h2d", "compute_s", "stall_s", "total_s", "tokens_per_s", "per_layer", "bounds"):
        assert k in rep, k
    assert rep["n_slots"] == 2 * 2**30 // 17_301_504 == 124 and rep["model"] == "deepseek-v2-lite"
    assert rep["accesses"] == 60 * 26 * 6 and len(rep["per_layer"]["misses"]) == 26
    assert rep["bounds"]["best_s"] <= rep["total_s"]
    tl = json.loads((tmp_path / "tl.json").read_text())
    assert any(e.get("args", {}).get("name") == "copy engine 0" for e in tl["traceEvents"])


def test_replay_text_summary(capsys):
    code, out, _ = _run(capsys, "replay", "--trace", LAW, "--device", "t4", "--budget", "48", "--tokens", "30",
                        "--cache-scope", "global")
    assert code == 0
    assert "budget 48 = 48 experts" in out and "tokens/s" in out and "all-resident" in out


@pytest.mark.parametrize("argv,msg", [
    (["--budget", "5"], "below the minimum of 6 experts"),
    (["--budget", "48", "--cache-scope", "per-layer"], "times 26 layers for per-layer scope"),
    (["--device", "tpu9"], "unknown device 'tpu9'"),
    (["--predictor", "gate"], "runs only in the executor"),
    (["--budget", "lots"], "cannot read budget 'lots'"),
    (["--model", "mixtral-8x7b"], "model mixtral-8x7b has 32 MoE layers but the trace"),
])
def test_replay_errors_are_one_line(capsys, argv, msg):
    base = {"--device": "t4", "--budget": "25%"}
    for k, v in zip(argv[::2], argv[1::2]):
        base[k] = v
    code, out, err = _run(capsys, "replay", "--trace", LAW, "--tokens", "10",
                          *[x for kv in base.items() for x in kv])
    assert code == 2
    assert err.startswith("moe-sim: error: ") and msg in err and err.count("\n") == 1 and "Traceback" not in err


def test_missing_trace_and_bad_experiment(capsys, tmp_path):
    code, _, err = _run(capsys, "replay", "--trace", str(tmp_path / "no.npz"), "--device", "t4")
    assert code == 2 and "trace file not found" in err
    bad = tmp_path / "e.yaml"
    bad.write_text("name: x\n")
    code, _, err = _run(capsys, "sweep", str(bad))
    assert code == 2 and "missing field(s)" in err
