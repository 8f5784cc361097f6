"""Hostile device, model and experiment YAML: bombs, huge or deep files, non-finite and out-of-range numbers."""

from __future__ import annotations

import json

import pytest
import yaml

from .conftest import GOOD_DEVICE, GOOD_MODEL, LAW, assert_one_error, run_bounded

LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))


def _replay_args(tmp_path, device=None, model=None):
    argv = ["replay", "--trace", LAW, "--tokens", "5", "--device", "t4"]
    if device is not None:
        (tmp_path / "dev.yaml").write_text(device)
        argv[-1] = tmp_path / "dev.yaml"
    if model is not None:
        (tmp_path / "model.yaml").write_text(model)
        argv += ["--model", tmp_path / "model.yaml"]
    return argv


def _experiment(tmp_path, **over) -> str:
    exp = {"name": "hostile", "trace": LAW, "tokens": 20, "budgets": ["40%"], "evictions": ["lru"],
           "predictors": ["none"], "devices": ["t4"], **over}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    return str(tmp_path / "exp.yaml")


@pytest.mark.parametrize("kind", ["device", "model", "experiment"])
def test_billion_laughs_is_refused_fast_and_small(tmp_path, kind):
    """Bounded subprocess: a regression would exhaust memory, not the test runner."""
    (tmp_path / "bomb.yaml").write_text(LAUGHS)
    argv = {"device": ["replay", "--trace", LAW, "--device", tmp_path / "bomb.yaml"],
            "model": ["replay", "--trace", LAW, "--model", tmp_path / "bomb.yaml", "--device", "t4"],
            "experiment": ["sweep", tmp_path / "bomb.yaml", "--out", tmp_path / "out"]}[kind]
    p = run_bounded("simulator.cli", argv, timeout=60)
    assert_one_error(p.returncode, p.stderr, "moe-sim", "anchors and aliases", "bomb.yaml")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,words", [
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", ["nested deeper than"]),
    ("# " + "x" * (2 << 20) + "\n", ["larger than"]),
    ("name: t4\nsource: \"" + "\\u00e9" * 10 + "\n", ["not valid YAML"]),
    ("h2d_latency_us: 2001-13-45\n", ["not valid YAML"]),
    ("h2d_latency_us: " + "9" * 5000 + "\n", ["not valid YAML"]),
    ("? [1, 2]\n: 3\n", ["not valid YAML"]),
    ("- just\n- a list\n", ["must be a mapping"]),
    (GOOD_DEVICE.replace("12.0", "'" + "x" * 100_000 + "'"), ["h2d_bandwidth_gbps must be"]),  # quoted short
    ("k" * 1000 + ": 1\n", ["unknown field(s)"]),
], ids=["deep", "huge", "unclosed-quote", "bad-date", "5000-digits", "list-key", "list", "long-value",
        "long-key"])
def test_malformed_device_documents(sim, tmp_path, text, words):
    code, _, err = sim(*_replay_args(tmp_path, device=text))
    assert_one_error(code, err, "moe-sim", "dev.yaml", *words)


def test_binary_file_and_fifo_are_refused(sim, tmp_path):
    import os
    (tmp_path / "dev.yaml").write_bytes(b"\xff\xfe\x00garbage")
    code, _, err = sim("replay", "--trace", LAW, "--device", tmp_path / "dev.yaml")
    assert_one_error(code, err, "moe-sim", "not UTF-8")
    os.mkfifo(tmp_path / "fifo.yaml")  # reading would block forever
    code, _, err = sim("replay", "--trace", LAW, "--device", tmp_path / "fifo.yaml")
    assert_one_error(code, err, "moe-sim", "fifo.yaml")


DEVICE_NUMBERS = ["h2d_bandwidth_gbps", "h2d_latency_us", "copy_engines", "hbm_bandwidth_gbps", "peak_tflops",
                  "memory_gib"]


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e400", "-3", "abc", "true", "[1]", "1e308"])
@pytest.mark.parametrize("field", DEVICE_NUMBERS + ["layer_compute_ms"])
def test_device_numbers_must_be_finite_and_in_range(sim, tmp_path, field, value):
    text = "\n".join(l for l in GOOD_DEVICE.splitlines() if not l.startswith(field + ":"))
    code, _, err = sim(*_replay_args(tmp_path, device=f"{text}\n{field}: {value}\n"))
    assert_one_error(code, err, "moe-sim", "dev.yaml", f"{field} must be")


def test_device_numbers_in_exponent_notation_parse(sim, tmp_path):
    """YAML 1.1 reads 1e1 as a string; the config loader reads it as the number it is."""
    text = GOOD_DEVICE.replace("h2d_latency_us: 10", "h2d_latency_us: 1e1").replace(
        "h2d_bandwidth_gbps: 12.0", "h2d_bandwidth_gbps: 1.2e1")
    code, out, err = sim(*_replay_args(tmp_path, device=text), "--json")
    assert code == 0, err
    code, ref, err = sim(*_replay_args(tmp_path), "--json")
    assert code == 0, err
    assert json.loads(out)["total_s"] == json.loads(ref)["total_s"]  # 1e1 == 10, 1.2e1 == 12.0


MODEL_INTS = ["n_layers", "n_experts", "top_k", "hidden_size", "moe_intermediate_size", "n_heads", "vocab_size",
              "first_moe_layer"]


@pytest.mark.parametrize("value", [".inf", ".nan", "1e12", "1000000000000", "-1", "abc", "2.5"])
@pytest.mark.parametrize("field", MODEL_INTS)
def test_model_numbers_must_be_finite_integers_in_range(trace_cli, tmp_path, field, value):
    text = "\n".join(l for l in GOOD_MODEL.splitlines() if not l.startswith(field + ":"))
    (tmp_path / "model.yaml").write_text(f"{text}\n{field}: {value}\n")
    out = tmp_path / "out.npz"
    code, _, err = trace_cli("synth", "--model", tmp_path / "model.yaml", "--tokens", 5, "--out", out)
    assert_one_error(code, err, "moe-trace", "model.yaml", f"{field} must be")
    assert not out.exists()


def test_model_error_through_replay(sim, tmp_path):
    code, _, err = sim(*_replay_args(tmp_path, model=GOOD_MODEL.replace("top_k: 6", "top_k: .nan")))
    assert_one_error(code, err, "moe-sim", "model.yaml", "top_k must be an integer")


@pytest.mark.parametrize("over,words", [
    ({"budgets": ["abc", "150%", "0%"]}, ["budget"]),
    ({"budgets": ["0%"]}, ["buys no expert"]),
    ({"budgets": ["1KiB"]}, ["buys no expert"]),  # less than one expert of this model
    ({"budgets": [1, 2]}, ["no point of the grid can run", "below the minimum"]),
    ({"budgets": [{"a": 1}]}, ["budgets must hold"]),
    ({"evictions": [["lru"]]}, ["evictions must hold names"]),
    ({"predictors": [7]}, ["predictors must hold names"]),
    ({"name": "../../x"}, ["name must be a plain name"]),
    ({"name": "/tmp/x"}, ["name must be a plain name"]),
    ({"recall": float("nan")}, ["recall must be a number"]),
    ({"precision": 2}, ["precision must be a number"]),
    ({"tokens": float("inf")}, ["tokens must be an integer"]),
    ({"seed": -1}, ["seed must be an integer"]),
    ({"lookaheads": [1.5]}, ["lookahead must be an integer"]),
    ({"batch": 10**9}, ["batch must be an integer"]),
    ({"max_inflight": float("inf")}, ["max_inflight must be an integer"]),
    ({"colour" * 1000: 1}, ["unknown field(s)"]),
])
def test_bad_experiments_are_refused_before_running(sim, tmp_path, over, words):
    exp = _experiment(tmp_path, **over)
    code, out, err = sim("sweep", exp, "--out", tmp_path / "out")
    assert_one_error(code, err, "moe-sim", *words)
    assert not (tmp_path / "out" / "results.json").exists()


def test_experiment_name_cannot_leave_out(sim, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = sim("sweep", _experiment(tmp_path, name="../../escaped"))
    assert_one_error(code, err, "moe-sim", "name must be a plain name")
    assert not (tmp_path.parent / "escaped").exists() and not (tmp_path / "out").exists()


def test_workers_zero_is_refused(sim, tmp_path):
    code, _, err = sim("sweep", _experiment(tmp_path), "--out", tmp_path / "out", "--workers", "0")
    assert_one_error(code, err, "moe-sim", "--workers must be >= 1")


def test_results_json_that_is_a_directory(sim, tmp_path):
    (tmp_path / "out" / "results.json").mkdir(parents=True)
    code, _, err = sim("sweep", _experiment(tmp_path), "--out", tmp_path / "out")
    assert_one_error(code, err, "moe-sim", "results.json", "not a sweep results file")


@pytest.mark.parametrize("tamper", [
    lambda d: d["results"].append({"key": 3}),
    lambda d: d["results"].append({**d["results"][0], "key": "x", "tokens_per_s": "fast"}),
    lambda d: d["results"].append("row"),
    lambda d: d.update(results={"a": 1}),
    lambda d: d.pop("fingerprint"),
])
def test_tampered_results_on_resume_are_one_line(sim, tmp_path, tamper):
    exp, out = _experiment(tmp_path), tmp_path / "out"
    code, _, err = sim("sweep", exp, "--out", out, "--workers", "1")
    assert code == 0, err
    doc = json.loads((out / "results.json").read_text())
    tamper(doc)
    (out / "results.json").write_text(json.dumps(doc))
    before = (out / "results.json").read_bytes()
    code, _, err = sim("sweep", exp, "--out", out, "--workers", "1")
    assert_one_error(code, err, "moe-sim", "results.json")
    assert (out / "results.json").read_bytes() == before
