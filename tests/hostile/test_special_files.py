"""Class 3 of issue 24: FIFOs, devices and folders named as input files are refused before they are opened
(``core.config_files.input_file``), each in one line that says what the path is."""

from __future__ import annotations

import os

import pytest

from .conftest import assert_one_error, run_bounded


@pytest.fixture
def fifo(tmp_path):
    p = tmp_path / "pipe"
    os.mkfifo(p)
    return p


def test_expert_source_disk_fifo(fifo, tiny):
    r = run_bounded("moe_runtime.cli.runtime", ["generate", "--model", tiny, "--prompt-ids", "1,2",
                                                "--max-new-tokens", 1, "--expert-source", f"disk:{fifo}"], timeout=60)
    assert_one_error(r.returncode, r.stderr, "moe-runtime", "FIFO", str(fifo))


# in-process from here: each refuses before any open, so a regression shows as the subprocess case above hanging
def test_sim_replay_expert_source_with_a_file_is_refused(sim, fifo):
    for src in (f"disk:{fifo}", "disk:/nonexistent.pack"):  # the simulator reads no file: a name means nothing
        code, _, err = sim("replay", "--trace", "traces/deepseek-v2-lite-law.npz", "--device", "t4", "--tokens", 5,
                           "--expert-source", src)
        assert_one_error(code, err, "moe-sim", "reads no expert file", "give --expert-source disk")


def test_trace_import_fifo(trace_cli, fifo):
    code, _, err = trace_cli("import", fifo, "--model", "deepseek-v2-lite", "--out", fifo.parent / "o.npz")
    assert_one_error(code, err, "moe-trace", "source file", "FIFO")


@pytest.mark.parametrize("what", ["fifo", "dir", "device", "missing"])
def test_calibrate_data_that_is_not_a_file(runtime, fifo, tiny, tmp_path, what):
    data = {"fifo": fifo, "dir": tmp_path, "device": "/dev/zero", "missing": tmp_path / "nope.txt"}[what]
    code, _, err = runtime("calibrate", "--model", tiny, "--data", data, "--lookahead", 1, "--rank", 1,
                           "--out", tmp_path / "a.safetensors")
    word = {"fifo": "is a FIFO", "dir": "is a directory", "device": "is a device", "missing": "not found"}[what]
    assert_one_error(code, err, "moe-runtime", "--data file", word)


def test_config_json_that_is_a_fifo(runtime, tiny, tmp_path):
    import shutil
    m = shutil.copytree(tiny, tmp_path / "m")
    (m / "config.json").unlink()
    os.mkfifo(m / "config.json")
    code, _, err = runtime("generate", "--model", m, "--prompt-ids", "1,2", "--max-new-tokens", 1)
    assert_one_error(code, err, "moe-runtime", "config.json", "FIFO")
