"""`moe-sim plan --out` follows the outputs rule (core/outputs.py): never an input of the run (checkpoint folder,
device, host profile), another kind of file only with --force; bad inputs get their own one-line error."""

from __future__ import annotations

import shutil

import pytest

from moe_runtime.core.outputs import REPO

from .conftest import assert_one_error

SMALL = ("--device", "rtx-4060-8gb", "--device-memory", "0.001", "--workspace", "0", "--context", "64",
         "--tokens", "16", "--host-ram", "64")


@pytest.fixture
def model(tiny, tmp_path):
    return shutil.copytree(tiny, tmp_path / "m")


def _plan(sim, model, *extra):
    return sim("plan", "--model", model, *SMALL, *extra)


def test_plan_out_inside_its_checkpoint_is_refused(sim, model):
    before = (model / "config.json").read_bytes()
    for extra in ((), ("--force",)):
        code, out, err = _plan(sim, model, "--out", model / "config.json", *extra)
        assert_one_error(code, err, "moe-sim", "--out", "inside the input", "choose another path")
        assert (model / "config.json").read_bytes() == before and out == ""


def test_plan_replaces_another_kind_only_with_force_and_an_earlier_plan_without(sim, model, tmp_path):
    csv = tmp_path / "results.csv"
    csv.write_text("budget,tokens_per_s\n10,1.0\n")
    code, _, err = _plan(sim, model, "--out", csv)
    assert_one_error(code, err, "moe-sim", "--out", "not an earlier plan output", "--force")
    assert csv.read_text() == "budget,tokens_per_s\n10,1.0\n"
    assert _plan(sim, model, "--out", csv, "--force")[0] == 0
    assert csv.read_text().startswith("# moe-sim plan: m on rtx-4060-8gb")
    plan = model / "plan.yaml"  # a new file in the checkpoint folder, then an earlier plan there: both fine
    assert _plan(sim, model, "--out", plan)[0] == 0
    assert _plan(sim, model, "--out", plan)[0] == 0 and "\nexpected:" in plan.read_text()


@pytest.mark.parametrize("flag, source", [("--host-profile", "configs/hosts/ddr5-desktop.yaml"),
                                          ("--device", "configs/devices/rtx-4060-8gb.yaml")])
def test_plan_out_over_its_host_profile_or_device_file_is_refused(sim, model, tmp_path, flag, source):
    f = tmp_path / "input.yaml"
    shutil.copy(REPO / source, f)
    before = f.read_bytes()
    code, _, err = _plan(sim, model, flag, f, "--out", f, "--force")
    assert_one_error(code, err, "moe-sim", "--out", "is the input", "choose another path")
    assert f.read_bytes() == before


@pytest.mark.parametrize("text, words", [(None, ["unknown host profile 'nope'", "known: ", "ddr5-desktop"]),
                                         ("memory_bandwidth_gbps: [", ["not valid YAML"]),
                                         ("x: 1\n", ["unknown field(s): x"])])
def test_plan_says_what_is_wrong_with_its_host_profile(sim, tmp_path, text, words):
    hp = "nope"
    if text is not None:
        hp = tmp_path / "host.yaml"
        hp.write_text(text)
    code, _, err = sim("plan", "--model", "deepseek-v2-lite", "--device", "rtx-4060-8gb", "--host-ram", "64",
                       "--host-profile", hp, "--out", tmp_path / "p.yaml")
    line = assert_one_error(code, err, "moe-sim", *words)
    assert "no configuration" not in line and not (tmp_path / "p.yaml").exists()
