"""Class 9 of issue 24, checked on the current tree: what the README says about quantized experts on disk is
true, and the messages a new user meets name the real problem."""

from __future__ import annotations

import json
import os

import pytest

from .conftest import REPO, assert_one_error


def test_readme_says_quantized_experts_work_on_disk():
    text = " ".join((REPO / "README.md").read_text().split())
    assert "Every format works from host memory and from a packed file on disk" in text
    low = text.lower()
    for wrong in ("quantized experts are refused", "refused on disk", "not supported on disk"):
        assert wrong not in low


@pytest.mark.parametrize("family,expert_dtype", [("mixtral", "int4"), ("mixtral", "int8"), ("gpt_oss", "auto")])
def test_quantized_experts_from_a_pack_decode_the_resident_tokens(runtime, tmp_path, family, expert_dtype):
    """The README's claim, run: a packed int4/int8 or MXFP4 model decodes from disk what it decodes resident."""
    extra = ["--expert-dtype", "mxfp4"] if family == "gpt_oss" else []
    code, _, err = runtime("make-tiny", "--family", family, "--out", tmp_path / "m", *extra)
    assert code == 0, err
    code, _, err = runtime("pack", "--model", tmp_path / "m", "--expert-dtype", expert_dtype, "--out",
                           tmp_path / "e.pack")
    assert code == 0, err
    gen = ["generate", "--model", tmp_path / "m", "--prompt-ids", "1,2,3", "--max-new-tokens", 3, "--json",
           "--expert-dtype", expert_dtype]
    code, out, err = runtime(*gen)
    assert code == 0, err
    resident = json.loads(out)["token_ids"]
    code, out, err = runtime(*gen, "--expert-source", f"disk:{tmp_path / 'e.pack'}", "--expert-budget", "50%")
    assert code == 0, err
    report = json.loads(out)
    assert report["token_ids"] == resident and report["misses"] > 0


def test_plain_text_generate_prints_one_offload_summary_line(runtime, tiny):
    code, out, err = runtime("generate", "--model", tiny, "--prompt-ids", "1,2", "--max-new-tokens", 2,
                             "--expert-budget", 4)
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if ln.startswith("[offload:")]
    assert len(lines) == 1
    for word in ("hits", "late", "misses of", "expert accesses", "stall", "copied into 4 slots"):
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("budget", ["-5%", "-5", "-2GiB"])
def test_a_negative_budget_says_negative_not_expected_one_argument(runtime, tiny, budget):
    code, _, err = runtime("generate", "--model", tiny, "--prompt-ids", "1", "--expert-budget", budget)
    line = assert_one_error(code, err, "moe-runtime", "--expert-budget", "is negative")
    assert "expected one argument" not in line


@pytest.mark.parametrize("command", ["calibrate", "eval-predictors"])
def test_a_fifo_as_data_says_fifo_not_not_found(runtime, tiny, tmp_path, command):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    extra = ["--rank", 1, "--out", tmp_path / "a.safetensors"] if command == "calibrate" else []
    code, _, err = runtime(command, "--model", tiny, "--data", fifo, "--lookahead", 1, *extra)
    line = assert_one_error(code, err, "moe-runtime", "--data file", "is a FIFO")
    assert "not found" not in line
