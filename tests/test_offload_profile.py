"""`moe-runtime profile` writes a device YAML the simulator loads; telemetry is absent without a GPU."""

from __future__ import annotations

import pytest
import torch
import yaml

from moe_runtime.cli.runtime import main
from moe_runtime.offload.telemetry import gpu_telemetry
from moe_runtime.model.tiny import write_tiny_checkpoint
from simulator.device import load_device

SPEC = dict(name="toy-moe", n_layers=3, first_moe_layer=1, n_experts=8, top_k=2, n_shared_experts=1,
            hidden_size=32, moe_intermediate_size=16, shared_intermediate_size=16, dense_intermediate_size=64,
            n_heads=4, vocab_size=50, dtype="float32")


def profile(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        main(["profile", "--device", "cpu", "--repeats", "3", *argv])
    return exc.value.code, capsys.readouterr()


def test_profile_of_a_checkpoint_is_a_valid_device(tmp_path, capsys):
    ckpt = write_tiny_checkpoint("mixtral", tmp_path / "m")
    out = tmp_path / "dev.yaml"
    code, _ = profile(capsys, "--model", str(ckpt), "--out", str(out))
    assert code == 0
    dev = load_device(str(out))
    assert dev.nominal is False and dev.h2d_bandwidth_gbps > 0 and dev.layer_compute_ms > 0
    assert 0 <= dev.copy_slowdown < 100  # measured with the copy thread busy: the compute it slows, if any
    assert "36864 bytes" not in dev.source and f"{3 * 64 * 96 * 4} bytes" in dev.source


def test_profile_of_a_model_config_uses_synthetic_weights(tmp_path, capsys):
    spec = tmp_path / "toy.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    code, out = profile(capsys, "--model-config", str(spec), "--layers", "1")
    assert code == 0
    d = yaml.safe_load(out.out)
    assert d["model"] == "toy-moe" and d["copy_engines"] == 1 and d["layer_compute_ms"] > 0


def test_telemetry_is_none_without_a_gpu():
    assert gpu_telemetry("cpu") is None
    if not torch.cuda.is_available():
        assert gpu_telemetry("cuda") is None
