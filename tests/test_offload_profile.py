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


def test_profile_writes_a_host_profile_the_executor_and_simulator_load(tmp_path, capsys):
    """--host-out: this host's expert compute with the executor's kernels, every format, as a host profile."""
    from moe_runtime.core.host_profile import load_host
    ckpt = write_tiny_checkpoint("mixtral", tmp_path / "m")
    out = tmp_path / "host.yaml"
    code, cap = profile(capsys, "--model", str(ckpt), "--host-out", str(out), "--name", "here")
    assert code == 0, cap.err
    host = load_host(str(out))
    assert host.name == "here" and host.nominal is False
    assert set(host.formats) == {"fp32", "bf16", "fp16", "int8", "int4", "mxfp4"}
    assert sorted(host.formats["bf16"]) == [1, 2, 4, 8, 16, 32]
    for per in host.formats.values():  # measured figures never above the measured memcpy bandwidth
        assert all(0 < gbps <= host.memory_bandwidth_gbps for gbps, _ in per.values())
    assert "host_forward" in host.measurement
    code, cap = profile(capsys, "--model", str(ckpt), "--host-out", str(out))  # an existing profile: --force
    assert code == 0
    code, cap = profile(capsys, "--model", str(ckpt), "--host-out", str(ckpt / "config.json"))
    assert code == 2 and "config.json" in cap.err


def test_a_nominal_host_profile_is_never_faster_than_its_dimm_bandwidth():
    from moe_runtime.core.host_profile import host_from_dict
    from moe_runtime.offload.host_bench import host_profile_yaml
    run = {"machine": "m", "threads": 2, "torch": "t", "hidden": 8, "intermediate": 4, "memcpy_gbps": 20.0,
           "rows": [{"format": "bf16", "batch": 1, "us": 1.0, "gbps": 30.0, "gflops": 1.0, "efficiency": 1.5},
                    {"format": "bf16", "batch": 8, "us": 2.0, "gbps": 10.0, "gflops": 4.0, "efficiency": 0.5}]}
    nominal = host_from_dict(yaml.safe_load(host_profile_yaml([run], "n", dimm_gbps=80.0, source="cited")))
    assert nominal.formats["bf16"] == {1: (80.0, 2.667), 8: (40.0, 16.0)}  # efficiency capped at 1 (3 decimals)
    measured = host_from_dict(yaml.safe_load(host_profile_yaml([run], "m")))
    assert measured.formats["bf16"][1][0] == 20.0  # capped at the measured memcpy
