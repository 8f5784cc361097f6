"""`moe-runtime generate` with offloading flags: one-line errors before loading, --json fields,
recording a trace and forcing it back, timeline lanes."""

from __future__ import annotations

import json
import shutil

import pytest

from moe_runtime.cli.runtime import main
from moe_runtime.model.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint("olmoe", tmp_path_factory.mktemp("olmoe"), seed=1, num_hidden_layers=3)


def gen(capsys, ckpt, *flags, new=4):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--model", str(ckpt), "--prompt-ids", "5,6,7", "--max-new-tokens", str(new), "--json",
              *flags])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_budget_below_minimum_is_refused_before_loading(capsys, ckpt, tmp_path):
    only_config = tmp_path / "cfg"
    only_config.mkdir()
    shutil.copy(ckpt / "config.json", only_config / "config.json")  # no weights: must not be needed
    code, out, err = gen(capsys, only_config, "--budget", "1", "--predictor", "gate", "--max-inflight", "2")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        "moe-runtime: error: expert budget of 1 experts (36,864 bytes) is below the minimum of 2 experts "
        "(73,728 bytes): one token's top-2 experts per layer"]


def test_json_fields_record_and_force(capsys, ckpt, tmp_path):
    code, out, _ = gen(capsys, ckpt)
    resident = json.loads(out)["token_ids"]
    trace, tl = tmp_path / "t.npz", tmp_path / "tl.json"
    code, out, _ = gen(capsys, ckpt, "--budget", "50%", "--predictor", "gate", "--record-trace", str(trace),
                       "--timeline", str(tl))
    r = json.loads(out)
    assert code == 0 and r["token_ids"] == resident
    for k in ("accesses", "hits", "late", "misses", "prefetch_issued", "prefetch_used", "prefetch_wasted",
              "bytes_h2d", "stall_s"):
        assert k in r
    assert r["hits"] + r["late"] + r["misses"] == r["accesses"] == sum(
        x["hits"] + x["late"] + x["misses"] for x in r["layers"])
    lanes = {e["args"]["name"] for e in json.load(open(tl))["traceEvents"] if e["name"] == "thread_name"}
    assert lanes == {"compute", "copy"}
    code, out, _ = gen(capsys, ckpt, "--budget", "2", "--route-from-trace", str(trace), "--policy", "belady")
    r = json.loads(out)
    assert code == 0 and r["token_ids"] == resident
    code, _, err = gen(capsys, ckpt, "--route-from-trace", str(trace), new=9)
    assert code == 2 and "has 6 tokens, but the run needs 11" in err


def test_trace_of_another_shape_and_missing_future_are_one_line_errors(capsys, ckpt, tmp_path):
    other = write_tiny_checkpoint("olmoe", tmp_path / "two", num_hidden_layers=2)
    trace = tmp_path / "t2.npz"
    assert gen(capsys, other, "--record-trace", str(trace))[0] == 0
    code, _, err = gen(capsys, ckpt, "--route-from-trace", str(trace))
    assert code == 2 and "does not match the model's (3, 8, 2)" in err and len(err.strip().splitlines()) == 1
    code, _, err = gen(capsys, ckpt, "--policy", "belady")
    assert code == 2 and "belady needs the future" in err
    for oracle in ("oracle", "noisy-oracle"):  # refused before decoding, with no copy in flight
        code, _, err = gen(capsys, ckpt, "--budget", "50%", "--predictor", oracle)
        assert code == 2 and err.strip() == (f"moe-runtime: error: --predictor {oracle} needs the true routing: "
                                             "give --route-from-trace FILE")


def test_aligned_predictor_with_adapters_file(capsys, ckpt, tmp_path):
    import torch

    from moe_runtime.core.model_config import load_config
    from moe_runtime.predictors.adapters import AlignedAdapters, model_fingerprint

    cfg = load_config(ckpt)
    ad = AlignedAdapters(n_moe_layers=3, hidden=cfg.hidden_size, lookahead=1, rank=2)
    g = torch.Generator().manual_seed(0)
    for l, d in ad.pairs():
        ad.set(l, d, torch.randn(cfg.hidden_size, 2, generator=g), torch.randn(cfg.hidden_size, 2, generator=g))
    path = tmp_path / "ad.safetensors"
    ad.save(str(path), model_fingerprint(cfg))
    resident = json.loads(gen(capsys, ckpt)[1])["token_ids"]
    code, out, err = gen(capsys, ckpt, "--predictor", "aligned", "--adapters", str(path), "--budget", "6",
                         "--max-inflight", "2")
    assert code == 0, err
    r = json.loads(out)
    assert r["token_ids"] == resident and r["prefetch_issued"] > 0
    code, _, err = gen(capsys, ckpt, "--predictor", "aligned", "--adapters", str(path), "--lookahead", "2")
    assert code == 2 and "lookahead 2 is needed" in err


def test_recorded_predictions_replay_like_the_live_predictor_on_a_later_sequence(capsys, ckpt, tmp_path):
    import numpy as np

    from moe_runtime.traces import load_trace, make_trace, save_trace

    rec = tmp_path / "rec.npz"
    flags = ("--budget", "6", "--max-inflight", "2")
    code, out, _ = gen(capsys, ckpt, *flags, "--predictor", "gate", "--record-trace", str(rec))
    live = json.loads(out)
    t = load_trace(str(rec))
    assert list(t.phase) == [0, 0, 0, 1, 1, 1] and t.predictions["gate"].shape == (6, 3, 1, 2)
    # the same tokens as sequence 1, after a 2-token sequence 0 whose predictions are all -1
    pad = 2
    both = make_trace(t.meta, np.concatenate([t.expert_ids[:pad], t.expert_ids]),
                      np.concatenate([t.weights[:pad], t.weights]), [0] * pad + [1] * t.n_tokens,
                      list(range(pad)) + list(t.position), [0] * pad + list(t.phase),
                      {"gate": np.concatenate([np.full((pad, 3, 1, 2), -1, np.int16), t.predictions["gate"]])})
    path = tmp_path / "both.npz"
    save_trace(both, str(path))
    again = tmp_path / "again.npz"
    code, out, err = gen(capsys, ckpt, *flags, "--predictor", "recorded:gate", "--route-from-trace", str(path),
                         "--trace-seq", "1", "--record-trace", str(again))
    assert code == 0, err
    replay = json.loads(out)
    assert replay["token_ids"] == live["token_ids"] and replay["accesses"] == live["accesses"]
    # what the replay predicted (recorded in shadow mode) is what the live gate predicted, token by token
    # (hit/miss counts with prefetching depend on copy timing, so they are not compared)
    assert np.array_equal(load_trace(str(again)).predictions["recorded:gate"], t.predictions["gate"])


@pytest.mark.parametrize("flags", [(), ("--expert-budget", "100%")], ids=["resident", "offloaded"])
def test_one_thread_rule_for_resident_and_offloaded_runs(capsys, ckpt, monkeypatch, flags):
    """Both paths compute on cores - 1 threads on CPU, so their speeds compare (issue 10, point 9)."""
    import os

    import torch

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    code, _, err = gen(capsys, ckpt, "--device", "cpu", *flags)
    assert code == 0, err
    assert calls == [max(1, (os.cpu_count() or 2) - 1)]
