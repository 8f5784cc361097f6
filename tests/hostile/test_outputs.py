"""Outputs: checked before the work, folders created, one line where impossible, nothing damaged."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
import yaml

from moe_runtime.core.errors import MoeError
from moe_runtime.core.outputs import TMP_PREFIX, check_output, remove_stale_temps, write_atomic, write_text_atomic

from .conftest import LAW, assert_one_error

ROOT = os.geteuid() == 0


def _unwritable(tmp_path) -> list:
    """Paths whose folder cannot be written: a read-only folder, or (root ignores modes) /proc."""
    if ROOT:
        return ["/proc/moe-hostile.json", "/proc/moe-hostile-dir/x.json"]
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return [ro / "x.json", ro / "sub" / "x.json"]


def _replay(sim, *extra):
    return sim("replay", "--trace", LAW, "--device", "t4", "--tokens", "5", *extra)


@pytest.mark.parametrize("flag", ["--out", "--timeline"])
def test_replay_output_into_missing_folders_is_created(sim, tmp_path, flag):
    target = tmp_path / "a" / "b" / "r.json"
    code, _, err = _replay(sim, flag, target)
    assert code == 0, err
    assert target.stat().st_size > 0 and not [p for p in target.parent.iterdir() if p.name != "r.json"]


@pytest.mark.parametrize("flag", ["--out", "--timeline"])
def test_replay_outputs_that_cannot_be_written(sim, tmp_path, flag):
    (tmp_path / "file").write_text("x")
    cases = [(tmp_path, "is a directory"), (tmp_path / "file" / "r.json", "is a file, not a directory"),
             (tmp_path / "file" / "deeper" / "r.json", "is a file, not a directory"),
             ("/dev/null", "not a regular file")]
    cases += [(p, "cannot write") for p in _unwritable(tmp_path)]
    for path, words in cases:
        code, out, err = _replay(sim, flag, path)
        assert_one_error(code, err, "moe-sim", flag, words)
        assert out == ""  # refused before the replay ran


def test_existing_outputs_are_untouched_by_failing_runs(sim, tmp_path):
    out, tl = tmp_path / "r.json", tmp_path / "tl.json"
    out.write_text("precious")
    tl.write_text("also precious")
    (tmp_path / "bad.yaml").write_text("name: x\n")
    for extra in (["--device", tmp_path / "bad.yaml"], ["--budget", "abc"], ["--timeline", tmp_path]):
        argv = ["replay", "--trace", LAW, "--tokens", "5", "--device", "t4", "--out", out, "--timeline", tl]
        argv += extra
        code, _, err = sim(*argv)
        assert code == 2, err
    assert out.read_text() == "precious" and tl.read_text() == "also precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "r.json", "tl.json"]


def test_moe_trace_outputs(trace_cli, tmp_path):
    (tmp_path / "file").write_text("x")
    code, _, err = trace_cli("synth", "--model", "mixtral-8x7b", "--tokens", 5, "--out", tmp_path / "new" / "s.npz")
    assert code == 0, err
    for path, words in [(tmp_path, "is a directory"), (tmp_path / "file" / "s.npz", "is a file")] + \
            [(p, "cannot write") for p in _unwritable(tmp_path)]:
        code, out, err = trace_cli("synth", "--model", "mixtral-8x7b", "--tokens", 5, "--out", path)
        assert_one_error(code, err, "moe-trace", "--out", words)
        code, out, err = trace_cli("import", LAW, "--model", "deepseek-v2-lite", "--out", path)
        assert_one_error(code, err, "moe-trace", "--out", words)


def test_sweep_output_directory(sim, tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({"name": "o", "trace": LAW, "tokens": 10, "budgets": ["40%"], "evictions": ["lru"],
                                   "predictors": ["none"], "devices": ["t4"]}))
    (tmp_path / "file").write_text("x")
    for path, words in [(tmp_path / "file", "not a directory"), (tmp_path / "file" / "d", "is a file")] + \
            [(p, "cannot write") for p in _unwritable(tmp_path)]:
        code, out, err = sim("sweep", exp, "--out", path)
        assert_one_error(code, err, "moe-sim", words)


def test_sweep_output_directory_is_not_the_checkout_or_a_checkpoint(sim, tmp_path):
    """A sweep's files never mix with the project's own (its top folder, its code, its docs) or with a
    checkpoint's; nothing is created there."""
    from moe_runtime.core.outputs import REPO
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({"name": "o", "trace": LAW, "tokens": 10, "budgets": ["40%"], "evictions": ["lru"],
                                   "predictors": ["none"], "devices": ["t4"]}))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"x")
    before = {p: sorted(os.listdir(p)) for p in (REPO, REPO / "moe_runtime", REPO / "docs", ckpt)}
    for path, words in [(REPO, "top folder"), (REPO / "moe_runtime", "under moe_runtime/"),
                        (REPO / "docs" / "sweep", "under docs/"), (ckpt, "holds a model checkpoint")]:
        code, out, err = sim("sweep", exp, "--out", path)
        assert_one_error(code, err, "moe-sim", "refusing", words)
    code, out, err = _replay(sim, "--bounds-cache", ckpt)  # every output folder, not only a sweep's
    assert_one_error(code, err, "moe-sim", "--bounds-cache", "holds a model checkpoint")
    assert before == {p: sorted(os.listdir(p)) for p in before}


def test_atomic_writer_keeps_old_content_on_a_full_disk(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(MoeError, match="cannot write .*f.txt: No space left on device"):
        write_atomic(path, full)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_usual_mode_under_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        write_text_atomic(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == mode


def test_stale_temps_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    names = [f"{TMP_PREFIX}{dead}-results.json-abc", f"{TMP_PREFIX}{os.getpid()}-mine-xyz", "results.json"]
    for n in names:
        (tmp_path / n).write_text("x")
    assert remove_stale_temps(tmp_path) == 1
    assert sorted(os.listdir(tmp_path)) == sorted(names[1:])


def test_check_output_makes_folders_and_writes_nothing(tmp_path):
    p = check_output(tmp_path / "x" / "y" / "z.json", "--out")
    assert p.parent.is_dir() and not p.exists() and os.listdir(p.parent) == []
