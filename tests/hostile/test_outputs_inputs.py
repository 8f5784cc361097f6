"""Class 1 of issue 24: an output never replaces an input of its run or a shipped file; an existing file that
is not an earlier output of the same kind is replaced only with --force (``core.outputs.check_output``)."""

from __future__ import annotations

import os
import shutil

import pytest

from moe_runtime.core.outputs import REPO

from .conftest import LAW, assert_one_error

T4 = REPO / "configs/devices/t4.yaml"


def _replay(sim, *extra):
    return sim("replay", "--trace", LAW, "--device", "t4", "--tokens", "5", "--bounds-cache", "", *extra)


@pytest.fixture
def model(tiny, tmp_path):
    """A private copy of the tiny checkpoint (a bug here must not damage the session's)."""
    return shutil.copytree(tiny, tmp_path / "m")


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_pack_over_its_own_checkpoint_is_refused(runtime, model):
    before = _snapshot(model)
    code, out, err = runtime("pack", "--model", model, "--out", model / "model.safetensors")
    assert_one_error(code, err, "moe-runtime", "--out", "inside the input", "choose another path")
    assert _snapshot(model) == before and out == ""


def test_pack_into_the_checkpoint_folder_as_a_new_file_works(runtime, model):
    code, _, err = runtime("pack", "--model", model, "--out", model / "experts.pack")
    assert code == 0, err
    code, _, err = runtime("pack", "--model", model, "--out", model / "experts.pack")  # an earlier pack: replaced
    assert code == 0, err


@pytest.mark.parametrize("how", ["plain", "dotdot", "symlink", "hardlink"])
def test_replay_out_over_a_shipped_device_profile_is_refused(sim, tmp_path, how):
    before = T4.read_bytes()
    target = {"plain": T4, "dotdot": REPO / "configs/models/../devices/t4.yaml"}.get(how)
    if how == "symlink":
        target = tmp_path / "link.json"
        target.symlink_to(T4)
    elif how == "hardlink":
        target = tmp_path / "hard.json"
        try:
            os.link(T4, target)
        except OSError:
            pytest.skip("no hard links across these file systems")
    code, out, err = _replay(sim, "--out", target, "--force")  # --force never overrides this rule
    assert_one_error(code, err, "moe-sim", "--out", "ships")
    assert T4.read_bytes() == before and out == ""


@pytest.mark.parametrize("flag", ["--out", "--timeline"])
def test_replay_output_onto_its_trace_is_refused(sim, tmp_path, flag):
    trace = tmp_path / "t.npz"
    shutil.copy(LAW, trace)
    link = tmp_path / "sub" / "l.json"
    link.parent.mkdir()
    link.symlink_to(trace)
    for target in (trace, link, tmp_path / "sub" / ".." / "t.npz"):
        code, out, err = sim("replay", "--trace", trace, "--device", "t4", "--tokens", "5", "--bounds-cache", "",
                             flag, target, "--force")
        assert_one_error(code, err, "moe-sim", flag, "input")
    assert trace.read_bytes() == open(LAW, "rb").read()


def test_replace_only_earlier_outputs_of_the_same_kind_without_force(sim, tmp_path):
    notes = tmp_path / "notes.json"
    notes.write_text('{"my": "notes"}')
    code, _, err = _replay(sim, "--out", notes)
    assert_one_error(code, err, "moe-sim", "not an earlier replay report", "--force")
    assert notes.read_text() == '{"my": "notes"}'
    report = tmp_path / "r.json"
    assert _replay(sim, "--out", report)[0] == 0
    code, _, err = _replay(sim, "--out", report)  # an earlier report: replaced
    assert code == 0, err
    code, _, err = _replay(sim, "--timeline", report)  # but a report is no timeline
    assert_one_error(code, err, "moe-sim", "not an earlier timeline")
    assert _replay(sim, "--out", notes, "--force")[0] == 0
    assert '"tokens_per_s"' in notes.read_text()
    empty = tmp_path / "empty.json"
    empty.write_text("")  # nothing to lose (mktemp)
    assert _replay(sim, "--out", empty)[0] == 0


def test_trace_commands_never_replace_their_input(trace_cli, tmp_path):
    like = tmp_path / "like.npz"
    shutil.copy(LAW, like)
    before = like.read_bytes()
    code, _, err = trace_cli("synth", "--like", like, "--out", like, "--tokens", 10)
    assert_one_error(code, err, "moe-trace", "input")
    src = tmp_path / "r.jsonl"
    src.write_text('{"x": 1}\n')
    code, _, err = trace_cli("import", src, "--model", "deepseek-v2-lite", "--out", src, "--force")
    assert_one_error(code, err, "moe-trace", "input")
    code, _, err = trace_cli("synth", "--model", "deepseek-v2-lite", "--tokens", 10,
                             "--out", REPO / "traces/deepseek-v2-lite-law.npz", "--force")
    assert_one_error(code, err, "moe-trace", "ships")
    assert like.read_bytes() == before and src.read_text() == '{"x": 1}\n'
    out = tmp_path / "s.npz"
    for _ in range(2):  # a second synth replaces the first: an earlier trace
        code, _, err = trace_cli("synth", "--model", "deepseek-v2-lite", "--tokens", 10, "--out", out)
        assert code == 0, err


def test_generate_outputs_never_replace_inputs(runtime, model, tmp_path):
    before = _snapshot(model)
    for flag in ("--record-trace", "--timeline"):
        code, out, err = runtime("generate", "--model", model, "--prompt-ids", "1,2", "--max-new-tokens", 1,
                                 "--expert-budget", "50%", flag, model / "config.json")
        assert_one_error(code, err, "moe-runtime", flag, "input")
    assert _snapshot(model) == before


def test_calibrate_and_profile_outputs(runtime, model, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("text")
    code, _, err = runtime("calibrate", "--model", model, "--data", data, "--lookahead", 1, "--rank", 1,
                           "--out", data)
    assert_one_error(code, err, "moe-runtime", "--out", "input")
    assert data.read_text() == "text"
    code, _, err = runtime("profile", "--device", "cpu", "--model-config", "mixtral-8x7b", "--layers", 1,
                           "--out", T4)
    assert_one_error(code, err, "moe-runtime", "--out", "ships")


def test_sweep_output_folder_inside_shipped_folders_is_refused(sim):
    code, _, err = sim("sweep", "configs/experiments/quickstart.yaml", "--out", REPO / "traces" / "x")
    assert_one_error(code, err, "moe-sim", "ships")
    assert not (REPO / "traces" / "x").exists()


@pytest.mark.parametrize("where", ["shipped", "file"])
def test_bounds_cache_is_an_output_folder(sim, tmp_path, where):
    """--bounds-cache writes files: a bundled folder or an existing file there is refused in one line, before
    the replay (a newcomer's replay wrote into configs/, and ignored a file without a word)."""
    path = REPO / "configs" if where == "shipped" else tmp_path / "results.csv"
    if where == "file":
        path.write_text("a,b\n")
    before = sorted(os.listdir(REPO / "configs"))
    code, out, err = sim("replay", "--trace", LAW, "--device", "t4", "--tokens", "5", "--bounds-cache", path)
    assert_one_error(code, err, "moe-sim", "--bounds-cache", "ships" if where == "shipped" else "not a directory")
    assert out == "" and sorted(os.listdir(REPO / "configs")) == before
    if where == "file":
        assert path.read_text() == "a,b\n"
