"""Class 6 of issue 24: names read from data files (a trace's meta.model, a sharded index's weight_map) resolve
only to bundled names or to files inside the folder they came from, checked lexically so that Hugging Face
snapshots (symlinks into a blob folder) keep working (``config_files.name_inside``)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from moe_runtime.traces import load_trace, save_trace

from .conftest import LAW, assert_one_error


def _trace_with_model(tmp_path, model: str):
    t = load_trace(LAW).slice(0, 5)
    t = dataclasses.replace(t, meta=dataclasses.replace(t.meta, model=model))
    path = tmp_path / "t.npz"
    save_trace(t, path)
    return path


@pytest.mark.parametrize("model", ["../../../../etc/passwd", "/etc/passwd", "~/x", "a/../../b"])
def test_trace_meta_model_outside_its_folder_is_refused(sim, tmp_path, model):
    code, _, err = sim("replay", "--trace", _trace_with_model(tmp_path, model), "--device", "t4")
    assert_one_error(code, err, "moe-sim", "meta.model", "outside its folder", "--model")


def test_trace_meta_model_inside_its_folder_and_bundled_names_work(sim, tmp_path):
    code, _, err = sim("replay", "--trace", _trace_with_model(tmp_path, "deepseek-v2-lite"), "--device", "t4")
    assert code == 0, err
    shutil.copy(__import__("moe_runtime.core.config_files", fromlist=["x"]).MODELS_DIR / "deepseek-v2-lite.yaml",
                tmp_path / "mine.yaml")
    code, _, err = sim("replay", "--trace", _trace_with_model(tmp_path, "mine.yaml"), "--device", "t4")
    assert code == 0, err


def _sharded(tiny, tmp_path, target: str):
    m = shutil.copytree(tiny, tmp_path / "m")
    shutil.move(m / "model.safetensors", tmp_path / "outside.safetensors")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "outside.safetensors"), framework="pt") as f:
        names = list(f.keys())
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: target for k in names}}))
    return m


@pytest.mark.parametrize("target", ["../outside.safetensors", "/abs/outside.safetensors"])
def test_weight_map_outside_the_checkpoint_is_refused(runtime, tiny, tmp_path, target):
    m = _sharded(tiny, tmp_path, target if target.startswith("..") else str(tmp_path / "outside.safetensors"))
    code, _, err = runtime("generate", "--model", m, "--prompt-ids", "1,2", "--max-new-tokens", 1)
    assert_one_error(code, err, "moe-runtime", "weight_map", "outside its folder")


def test_hugging_face_snapshot_symlinks_into_blobs_work(runtime, tiny, tmp_path):
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for f in tiny.iterdir():
        shutil.copy(f, blobs / f"sha-{f.name}")
        (snap / f.name).symlink_to(f"../../blobs/sha-{f.name}")  # as huggingface_hub lays a snapshot out
    code, out, err = runtime("generate", "--model", snap, "--prompt-ids", "1,2", "--max-new-tokens", 2, "--json")
    assert code == 0, err
    ref = runtime("generate", "--model", tiny, "--prompt-ids", "1,2", "--max-new-tokens", 2, "--json")[1]
    assert json.loads(out)["token_ids"] == json.loads(ref)["token_ids"]
