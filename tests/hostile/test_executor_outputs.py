"""Executor outputs (generate's trace and timeline, calibrate, eval-predictors' plot, profile, make-tiny):
checked before the work, missing folders created, one line where impossible, existing files untouched."""

from __future__ import annotations

import os

import pytest

from .conftest import assert_one_error, precious
from .test_outputs import _unwritable

CAL = ["--random-tokens", 48, "--seq-len", 16, "--lookahead", 1, "--rank", 2]


def _bad_outputs(tmp_path) -> list:
    (tmp_path / "file").write_text("x")
    return [(tmp_path, "is a directory"), (tmp_path / "file" / "o", "is a file, not a directory"),
            ("/dev/null", "not a regular file")] + [(p, "cannot write") for p in _unwritable(tmp_path)]


@pytest.mark.parametrize("flag", ["--record-trace", "--timeline"])
def test_generate_outputs_refused_before_decoding(runtime, tiny, tmp_path, flag):
    for path, words in _bad_outputs(tmp_path):
        code, out, err = runtime("generate", "--model", tiny, "--prompt-ids", "1,2", "--max-new-tokens", 3,
                                 "--expert-budget", 4, flag, path)
        assert_one_error(code, err, "moe-runtime", flag, words)
        assert out == ""  # refused before any text was decoded


def test_generate_outputs_into_new_folders(runtime, tiny, tmp_path):
    tr, tl = tmp_path / "a" / "b" / "t.npz", tmp_path / "c" / "tl.json"
    code, out, err = runtime("generate", "--model", tiny, "--prompt-ids", "1,2", "--max-new-tokens", 3,
                             "--record-trace", tr, "--timeline", tl)
    assert code == 0, err
    assert tr.stat().st_size > 0 and tl.stat().st_size > 0
    assert {p.stat().st_mode & 0o777 for p in (tr, tl)} == {0o666 & ~_umask()}


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def test_calibrate_out_refused_before_fitting(runtime, tiny, tmp_path):
    for path, words in _bad_outputs(tmp_path):
        code, out, err = runtime("calibrate", "--model", tiny, *CAL, "--out", path)
        assert_one_error(code, err, "moe-runtime", "--out", words)
        assert out == ""


def test_calibrate_and_plot_into_new_folders_with_the_usual_mode(runtime, tiny, tmp_path):
    ad, png = tmp_path / "x" / "y" / "a.safetensors", tmp_path / "p" / "r.png"
    code, out, err = runtime("calibrate", "--model", tiny, *CAL, "--refine-steps", 0, "--out", ad)
    assert code == 0, err
    code, out, err = runtime("eval-predictors", "--model", tiny, "--random-tokens", 48, "--seq-len", 16,
                             "--lookahead", 1, "--predictors", "gate,aligned", "--adapters", ad, "--plot", png)
    assert code == 0, err
    for p in (ad, png):
        assert p.stat().st_mode & 0o777 == 0o666 & ~_umask()
        assert [q.name for q in p.parent.iterdir()] == [p.name]  # no temporary file left


def test_eval_plot_refused_before_evaluating(runtime, tiny, tmp_path):
    old = precious(tmp_path / "keep.png")
    for path, words in _bad_outputs(tmp_path):
        code, out, err = runtime("eval-predictors", "--model", tiny, "--random-tokens", 48, "--lookahead", 1,
                                 "--plot", path)
        assert_one_error(code, err, "moe-runtime", "--plot", words)
        assert out == ""
    assert old.read_text() == "precious"


def test_profile_out_refused_before_measuring(runtime, tiny, tmp_path):
    for path, words in _bad_outputs(tmp_path):
        code, out, err = runtime("profile", "--device", "cpu", "--model", tiny, "--out", path)
        assert_one_error(code, err, "moe-runtime", "--out", words)
        assert out == ""


def test_make_tiny_out_that_cannot_be_a_folder(runtime, tmp_path):
    (tmp_path / "file").write_text("x")
    for path, words in [(tmp_path / "file", "not a directory"), (tmp_path / "file" / "d", "is a file")]:
        code, _, err = runtime("make-tiny", "--family", "mixtral", "--out", path)
        assert_one_error(code, err, "moe-runtime", words)
    assert (tmp_path / "file").read_text() == "x"
