"""Class 7 of issue 24: values accepted that mean nothing are refused, by type and range, where they are read."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from .conftest import GOOD_DEVICE, LAW, assert_one_error


@pytest.mark.parametrize("field,value,words", [
    ("torch_dtype", "float64x", ["torch_dtype must be one of", "float64x"]),
    ("eos_token_id", -3, ["eos_token_id", "-3"]),
    ("eos_token_id", 10**9, ["eos_token_id", "outside the vocabulary"]),
    ("rope_theta", float("inf"), ["rope_theta", "finite"]),
    ("max_position_embeddings", 0, ["max_position_embeddings", "[1,"]),
    ("max_position_embeddings", "abc", ["max_position_embeddings must be an integer", "'abc'"]),
    ("num_hidden_layers", -2, ["num_hidden_layers", "-2"]),
    ("rms_norm_eps", -1e-5, ["rms_norm_eps", "> 0"]),
])
def test_config_json_fields(runtime, tiny, tmp_path, field, value, words):
    m = shutil.copytree(tiny, tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    cfg[field] = value
    (m / "config.json").write_text(json.dumps(cfg))
    code, out, err = runtime("generate", "--model", m, "--prompt-ids", "1,2", "--max-new-tokens", 1)
    assert_one_error(code, err, "moe-runtime", "config", *words)
    assert out == ""


def test_routed_scaling_factor_negative(runtime, tmp_path):
    from moe_runtime.model.tiny import write_tiny_checkpoint
    m = write_tiny_checkpoint("deepseek_v3", tmp_path / "d")
    cfg = json.loads((m / "config.json").read_text())
    cfg["routed_scaling_factor"] = -2.5
    (m / "config.json").write_text(json.dumps(cfg))
    code, _, err = runtime("generate", "--model", m, "--prompt-ids", "1,2", "--max-new-tokens", 1)
    assert_one_error(code, err, "moe-runtime", "routed_scaling_factor", "> 0", "-2.5")


def test_a_5000_digit_number_in_config_json(runtime, tiny, tmp_path):
    m = shutil.copytree(tiny, tmp_path / "m")
    text = (m / "config.json").read_text()
    (m / "config.json").write_text(text.replace('"vocab_size": ', '"vocab_size": ' + "9" * 5000 + ", \"x\": ", 1))
    code, _, err = runtime("generate", "--model", m, "--prompt-ids", "1,2", "--max-new-tokens", 1)
    assert_one_error(code, err, "moe-runtime", "cannot parse", "config.json")


@pytest.mark.parametrize("budget,words", [
    ("", ["--expert-budget", "empty"]), ("9" * 5000, ["--expert-budget", "5,000 characters"]),
    ("-5%", ["--expert-budget", "negative"]), ("-2GiB", ["negative"]), ("abc", ["cannot read budget 'abc'"])])
def test_budgets_that_mean_nothing(sim, runtime, tiny, budget, words):
    code, _, err = sim("replay", "--trace", LAW, "--device", "t4", "--tokens", 5, "--expert-budget", budget)
    assert_one_error(code, err, "moe-sim", *words)
    code, _, err = runtime("generate", "--model", tiny, "--prompt-ids", "1,2", "--max-new-tokens", 1,
                           "--expert-budget", budget)
    assert_one_error(code, err, "moe-runtime", *words)


def test_replay_host_budget_below_the_host_tier_minimum(sim):
    code, _, err = sim("replay", "--trace", LAW, "--device", "rtx-4060-8gb", "--tokens", 5, "--expert-source",
                       "disk", "--host-budget", "0")
    assert_one_error(code, err, "moe-sim", "--host-budget of 0 experts", "minimum of")


@pytest.mark.parametrize("field,value", [("h2d_bandwidth_gbps", "1e-300"), ("peak_tflops", "1e-300"),
                                         ("hbm_bandwidth_gbps", "0.0000001")])
def test_device_rates_near_zero(sim, tmp_path, field, value):
    dev = tmp_path / "d.yaml"
    dev.write_text("\n".join(f"{field}: {value}" if line.startswith(f"{field}:") else line
                             for line in GOOD_DEVICE.splitlines()))
    code, _, err = sim("replay", "--trace", LAW, "--device", dev, "--tokens", 5)
    assert_one_error(code, err, "moe-sim", field, ">= 0.001")


def test_duplicate_yaml_keys_are_refused(sim, tmp_path):
    dev = tmp_path / "d.yaml"
    dev.write_text(GOOD_DEVICE + "\nh2d_bandwidth_gbps: 900\n")
    code, _, err = sim("replay", "--trace", LAW, "--device", dev, "--tokens", 5)
    assert_one_error(code, err, "moe-sim", "h2d_bandwidth_gbps", "given twice")


def test_recorded_predictions_at_a_larger_lookahead(sim, tmp_path):
    from moe_runtime.traces import load_trace, save_trace
    t = load_trace(LAW).slice(0, 20)
    L, E, k = t.n_layers, t.n_experts, t.top_k
    preds = np.full((t.n_tokens, L, 1, k), -1, dtype=np.int16)  # recorded at lookahead 1
    save_trace(type(t)(**{**t.__dict__, "predictions": {"mine": preds}}), tmp_path / "r.npz")
    ok = sim("replay", "--trace", tmp_path / "r.npz", "--device", "t4", "--predictor", "recorded:mine",
             "--lookahead", 1)
    assert ok[0] == 0, ok[2]
    code, _, err = sim("replay", "--trace", tmp_path / "r.npz", "--device", "t4", "--predictor", "recorded:mine",
                       "--lookahead", 2)
    assert_one_error(code, err, "moe-sim", "recorded at lookahead 1", "--lookahead 2")


def test_calibrate_too_few_tokens_says_the_minimum(runtime, tiny, tmp_path):
    base = ["calibrate", "--model", tiny, "--lookahead", 1, "--rank", 2, "--out", tmp_path / "a.safetensors"]
    code, _, err = runtime(*base, "--random-tokens", 1)
    assert_one_error(code, err, "moe-runtime", "at least 2 chunks", "1 chunk")
    code, _, err = runtime(*base, "--random-tokens", 6, "--seq-len", 2)
    assert_one_error(code, err, "moe-runtime", "more than 4 tokens", "got 4")
    assert not (tmp_path / "a.safetensors").exists()


def test_synth_model_is_used_or_refused(trace_cli, tmp_path):
    like = "traces/mixtral-8x7b-humaneval.npz"
    code, _, err = trace_cli("synth", "--like", like, "--model", "deepseek-v2-lite", "--out", tmp_path / "s.npz")
    assert_one_error(code, err, "moe-trace", "--model deepseek-v2-lite", "drop one")
    code, _, err = trace_cli("synth", "--like", like, "--model", "mixtral-8x7b", "--tokens", 20,
                             "--out", tmp_path / "s.npz")
    assert code == 0, err
    from moe_runtime.traces import load_trace
    assert load_trace(tmp_path / "s.npz").meta.model == "mixtral-8x7b"


# -- class 9: what a new user trips over ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_make_tiny_defaults_run_lookahead_2(runtime, tmp_path, family):
    code, out, err = runtime("make-tiny", "--family", family, "--out", tmp_path / "m")
    assert code == 0 and "(4 layers)" in out, err
    code, out, err = runtime("generate", "--model", tmp_path / "m", "--prompt-ids", "1,2", "--max-new-tokens", 2,
                             "--predictor", "history", "--lookahead", 2, "--expert-budget", "100%")
    assert code == 0, err
    line = [ln for ln in err.splitlines() if ln.startswith("[offload:")]
    assert len(line) == 1 and "misses of" in line[0] and "stall" in line[0], err


def test_mxfp4_experts_on_disk_without_a_pack_say_pack_first(runtime, tmp_path):
    code, _, err = runtime("make-tiny", "--family", "gpt_oss", "--expert-dtype", "mxfp4", "--out", tmp_path / "m")
    assert code == 0, err
    code, _, err = runtime("generate", "--model", tmp_path / "m", "--prompt-ids", "1,2", "--max-new-tokens", 1,
                           "--expert-source", "disk")
    assert_one_error(code, err, "moe-runtime", "mxfp4", "pack them first", "--expert-source disk:FILE")
