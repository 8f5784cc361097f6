"""Trace format v1: round trips, every validation error, atomic writes."""

import dataclasses
import json
import os
import zipfile

import numpy as np
import pytest

from moe_runtime.traces import format as tr
from moe_runtime.core.errors import MoeError
from moe_runtime.traces import (FORMAT_VERSION, PHASE_DECODE, PHASE_PREFILL, Trace, TraceMeta,
                               TraceRecorder, load_trace, make_trace, save_trace)

META = TraceMeta(model="tiny", n_layers=3, n_experts=4, top_k=2, expert_bytes=1000,
                 dtype="bfloat16", source="unit test", extra={"note": "x"})


def tiny(T=5, with_pred=True) -> Trace:
    rng = np.random.default_rng(0)
    ids = np.stack([[rng.permutation(4)[:2] for _ in range(3)] for _ in range(T)])
    w = rng.random((T, 3, 2)).astype(np.float32)
    preds = {}
    if with_pred:
        p = np.full((T, 3, 2, 2), -1)
        p[:, 0, 0] = ids[:, 1]  # layer 0 predicts layer 1
        p[:, 0, 1] = ids[:, 2]  # and layer 2
        p[:, 1, 0] = ids[:, 2]  # layer 1 predicts layer 2
        preds["oracle"] = p
    return make_trace(META, ids, w, seq_id=[0, 0, 0, 1, 1][:T], position=[0, 1, 2, 0, 1][:T],
                      phase=[0, 0, 1, 0, 1][:T], predictions=preds)


def test_round_trip(tmp_path):
    t = tiny()
    save_trace(t, tmp_path / "t.npz")
    u = load_trace(tmp_path / "t.npz")
    assert u.meta == t.meta and u.meta.extra == {"note": "x"}
    np.testing.assert_array_equal(u.expert_ids, t.expert_ids)
    np.testing.assert_allclose(u.weights, t.weights, rtol=1e-3)
    assert u.weights.dtype == np.float32 and u.expert_ids.dtype == np.int16
    np.testing.assert_array_equal(u.predictions["oracle"], t.predictions["oracle"])
    assert (u.n_tokens, u.n_layers, u.n_experts, u.top_k, u.lookahead("oracle")) == (5, 3, 4, 2, 2)
    assert u.sequences() == [(0, 0, 3), (1, 3, 5)]
    with np.load(tmp_path / "t.npz", allow_pickle=False) as d:
        assert set(d.files) == {"format_version", "meta", "expert_ids", "weights", "seq_id",
                                "position", "phase", "pred.oracle"}
        assert d["weights"].dtype == np.float16 and int(d["format_version"]) == FORMAT_VERSION


def test_meta_accepts_numpy_integers(tmp_path):
    meta = dataclasses.replace(META, n_layers=np.int64(3), expert_bytes=np.int32(1000))
    t = make_trace(meta, tiny().expert_ids, tiny().weights)
    save_trace(t, tmp_path / "n.npz")
    assert load_trace(tmp_path / "n.npz").meta == META


def test_slice_and_lookahead_errors():
    t = tiny()
    s = t.slice(2, 4)
    assert s.n_tokens == 2 and s.sequences() == [(0, 0, 1), (1, 1, 2)]
    np.testing.assert_array_equal(s.expert_ids, t.expert_ids[2:4])
    with pytest.raises(MoeError, match="bad token slice"):
        t.slice(3, 3)
    with pytest.raises(MoeError, match="no predictor 'x'"):
        t.lookahead("x")


def test_recorder_matches_make_trace(tmp_path):
    t = tiny()
    rec = TraceRecorder(META)
    for i in range(t.n_tokens):
        rec.add_token(int(t.seq_id[i]), int(t.position[i]), int(t.phase[i]), t.expert_ids[i],
                      t.weights[i], {"oracle": t.predictions["oracle"][i]})
    rec.save(tmp_path / "r.npz")
    u = load_trace(tmp_path / "r.npz")
    np.testing.assert_array_equal(u.expert_ids, t.expert_ids)
    np.testing.assert_array_equal(u.phase, [PHASE_PREFILL, PHASE_PREFILL, PHASE_DECODE, 0, 1])
    with pytest.raises(MoeError, match="must both be"):
        rec.add_token(0, 0, 1, np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(MoeError, match="predictors"):
        rec.add_token(0, 0, 1, t.expert_ids[0], t.weights[0], None)
    with pytest.raises(MoeError, match="no tokens"):
        TraceRecorder(META).to_trace()


def _bad(t: Trace, **changes) -> Trace:
    return dataclasses.replace(t, **changes)


@pytest.mark.parametrize("mutate, message", [
    (lambda t: _bad(t, expert_ids=np.where(t.expert_ids == 3, 4, t.expert_ids).astype(np.int16)),
     "expert id 4 out of range"),
    (lambda t: _bad(t, expert_ids=np.where(t.expert_ids == 3, -1, t.expert_ids).astype(np.int16)),
     "expert id -1 out of range"),
    (lambda t: _bad(t, expert_ids=np.repeat(t.expert_ids[..., :1], 2, axis=2)), "repeats an expert id"),
    (lambda t: _bad(t, expert_ids=t.expert_ids.astype(np.int64)), "expert_ids has dtype int64"),
    (lambda t: _bad(t, expert_ids=t.expert_ids[:, :2]), "2 layers but meta.n_layers=3"),
    (lambda t: _bad(t, expert_ids=t.expert_ids[..., :1], weights=t.weights[..., :1]), "meta.top_k=2"),
    (lambda t: _bad(t, weights=t.weights[:4]), "weights shape"),
    (lambda t: _bad(t, seq_id=t.seq_id[:4]), "seq_id has 4 entries but the trace has 5"),
    (lambda t: _bad(t, position=t.position.astype(np.int64)), "position has dtype int64"),
    (lambda t: _bad(t, phase=np.full(5, 2, np.int8)), "phase at token 0 is 2"),
    (lambda t: _bad(t, weights=np.full((5, 3, 2), np.nan, np.float32)), "NaN"),
    (lambda t: _bad(t, weights=-t.weights), "negative weight"),
    (lambda t: _bad(t, position=-t.position - 1), "negative position"),
    (lambda t: _bad(t, meta=dataclasses.replace(META, n_experts=3)), "out of range \\[0, 3\\)"),
    (lambda t: _bad(t, meta=dataclasses.replace(META, top_k=5)), "top_k=5 exceeds"),
    (lambda t: _bad(t, meta=dataclasses.replace(META, expert_bytes=-1)), "expert_bytes must be >= 0"),
    (lambda t: _bad(t, meta=dataclasses.replace(META, extra={"a": object()})), "not JSON-serialisable"),
    (lambda t: _bad(t, predictions={"p": t.predictions["oracle"][:, :2]}), "predictions\\['p'\\] has shape"),
    (lambda t: _bad(t, predictions={"p": np.full((5, 3, 1, 1), 9, np.int16)}), "expert id 9 out of range \\[-1"),
    (lambda t: _bad(t, predictions={"p": np.full((5, 3, 1, 1), 0, np.int16)}), "beyond the last layer"),
    (lambda t: _bad(t, predictions={"p": np.zeros((5, 3, 1, 2), np.int16)}), "repeats an expert id"),
    (lambda t: _bad(t, expert_ids=t.expert_ids[:0], weights=t.weights[:0], seq_id=t.seq_id[:0],
                    position=t.position[:0], phase=t.phase[:0], predictions={}), "no tokens"),
])
def test_validate_errors(mutate, message, tmp_path):
    bad = mutate(tiny())
    with pytest.raises(MoeError, match=message):
        bad.validate()
    with pytest.raises(MoeError, match=message):  # save refuses, and writes nothing
        save_trace(bad, tmp_path / "bad.npz")
    assert not os.path.exists(tmp_path / "bad.npz")


def _write_npz(path, **arrays):
    np.savez_compressed(path, **arrays)
    return path


def _arrays(t: Trace) -> dict:
    return {"format_version": np.array(1, np.int32), "meta": np.array(t.meta.to_json()),
            "expert_ids": t.expert_ids, "weights": t.weights.astype(np.float16), "seq_id": t.seq_id,
            "position": t.position, "phase": t.phase}


def test_load_errors_name_file_and_problem(tmp_path):
    t = tiny(with_pred=False)
    good = _arrays(t)
    cases = {
        "unknown trace format version 2": dict(good, format_version=np.array(2)),
        "missing key 'weights'": {k: v for k, v in good.items() if k != "weights"},
        "no 'format_version' key": {k: v for k, v in good.items() if k != "format_version"},
        "missing field\\(s\\): n_experts, top_k": dict(good, meta=np.array(json.dumps(
            {k: v for k, v in json.loads(t.meta.to_json()).items() if k not in ("n_experts", "top_k")}))),
        "unknown field\\(s\\): bogus": dict(good, meta=np.array(json.dumps(dict(json.loads(t.meta.to_json()),
                                                                                bogus=1)))),
        "metadata is not valid JSON": dict(good, meta=np.array("{nope")),
        "meta.n_layers must be an integer": dict(good, meta=np.array(json.dumps(dict(json.loads(t.meta.to_json()),
                                                                                    n_layers="3")))),
        "unknown key\\(s\\) in trace file: junk": dict(good, junk=np.zeros(1)),
        "repeats an expert id": dict(good, expert_ids=np.zeros((5, 3, 2), np.int16)),
        "seq_id has dtype int64": dict(good, seq_id=t.seq_id.astype(np.int64)),
    }
    for i, (message, arrays) in enumerate(cases.items()):
        path = _write_npz(tmp_path / f"c{i}.npz", **arrays)
        with pytest.raises(MoeError, match=f"c{i}.npz: .*{message}"):
            load_trace(path)


def test_load_rejects_non_traces(tmp_path):
    save_trace(tiny(), tmp_path / "ok.npz")
    raw = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "text.npz").write_text("hello, not a zip\n")
    flipped = bytearray(raw)
    start = raw.index(b"expert_ids.npy") + 200  # inside that member's compressed data
    flipped[start:start + 64] = bytes(64)
    (tmp_path / "corrupt.npz").write_bytes(bytes(flipped))
    np.save(tmp_path / "single.npy", np.zeros(3))
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "hi")
    _write_npz(tmp_path / "obj.npz", **dict(_arrays(tiny()), meta=np.array([{"a": 1}], dtype=object)))
    expect = {"trunc.npz": "not a readable .npz|corrupt, truncated",
              "text.npz": "not a readable .npz",
              "corrupt.npz": "corrupt, truncated|not a readable",
              "single.npy": "single .npy array",
              "other.zip": "no 'format_version' key",
              "obj.npz": "Object arrays cannot be loaded"}
    for name, message in expect.items():
        with pytest.raises(MoeError, match=message):
            load_trace(tmp_path / name)
    with pytest.raises(MoeError, match="trace file not found"):
        load_trace(tmp_path / "absent.npz")
    with pytest.raises(MoeError, match="is a directory"):
        load_trace(tmp_path)


def test_failed_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "t.npz"
    save_trace(tiny(), path)
    before = path.read_bytes()

    def explode(f, **arrays):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(tr.np, "savez_compressed", explode)
    with pytest.raises(MoeError, match="cannot write .*t.npz: disk full"):
        save_trace(tiny(3), path)  # existing file is not clobbered
    with pytest.raises(MoeError, match="cannot write .*new.npz: disk full"):
        save_trace(tiny(3), tmp_path / "new.npz")  # and no file appears under the new name
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["t.npz"]  # no temp files left behind
    with pytest.raises(MoeError, match="does not exist"):
        save_trace(tiny(), tmp_path / "nodir" / "t.npz")
