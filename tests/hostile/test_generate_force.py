"""Class 1 of issue 24 for generate: an existing file at --record-trace or --timeline that is not an earlier
output of that kind is replaced only with --force; an earlier output of the kind is replaced as before; and
--force alone does not turn offloading on."""

from __future__ import annotations

import json

import pytest

from .conftest import assert_one_error, precious

GEN = ["--prompt-ids", "1,2", "--max-new-tokens", 2, "--expert-budget", 4]


@pytest.mark.parametrize("flag,magic", [("--record-trace", b"PK\x03\x04"), ("--timeline", b"{")])
def test_another_kind_of_file_is_replaced_only_with_force(runtime, tiny, tmp_path, flag, magic):
    notes = precious(tmp_path / "notes.txt", "my notes")
    code, out, err = runtime("generate", "--model", tiny, *GEN, flag, notes)
    assert_one_error(code, err, "moe-runtime", flag, "is not an earlier", "--force")
    assert out == "" and notes.read_text() == "my notes"  # refused before decoding, untouched
    code, out, err = runtime("generate", "--model", tiny, *GEN, flag, notes, "--force")
    assert code == 0, err
    assert notes.read_bytes().startswith(magic)


@pytest.mark.parametrize("flag", ["--record-trace", "--timeline"])
def test_an_earlier_output_of_the_kind_is_replaced_without_force(runtime, tiny, tmp_path, flag):
    path = tmp_path / "o"
    for _ in range(2):
        code, _, err = runtime("generate", "--model", tiny, *GEN, flag, path)
        assert code == 0, err


def test_force_alone_keeps_every_expert_resident(runtime, tiny):
    code, out, err = runtime("generate", "--model", tiny, "--prompt-ids", "1,2", "--max-new-tokens", 2, "--json",
                             "--force")
    assert code == 0, err
    report = json.loads(out)
    assert "hits" not in report and "budget_slots" not in report  # the all-resident reference, not offloaded


@pytest.mark.parametrize("input_flag", ["--config", "--host-profile"])
def test_force_never_replaces_an_input_of_the_run(runtime, tiny, tmp_path, input_flag):
    """--config and --host-profile files are inputs like the model: an output at their path is refused even
    with --force (a newcomer's plan file became timeline JSON)."""
    import shutil
    from pathlib import Path

    path = tmp_path / "in.yaml"
    if input_flag == "--config":
        path.write_text("budget: 50%\n")
    else:
        shutil.copy(Path(__file__).parents[2] / "configs" / "hosts" / "ddr5-desktop.yaml", path)
    before = path.read_bytes()
    code, out, err = runtime("generate", "--model", tiny, *GEN, input_flag, path, "--timeline", path, "--force")
    assert_one_error(code, err, "moe-runtime", "--timeline", "input")
    assert path.read_bytes() == before
