"""Flag values that parse but mean nothing (nan, inf, negative seeds, empty items, out-of-range shares):
refused by the one argparse type (cli/options.py) or the command's check, as one line, before any work."""

from __future__ import annotations

import pytest

from .conftest import LAW, assert_one_error, precious


def _gen(runtime, model, *flags):
    return runtime("generate", "--model", model, "--prompt-ids", "1,2", "--max-new-tokens", 2, *flags)


@pytest.mark.parametrize("flag,value", [
    ("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-1"), ("--temperature", "abc"),
    ("--top-p", "nan"), ("--top-p", "0"), ("--top-p", "1.5"), ("--top-p", "-inf"),
    ("--seed", "-1"), ("--seed", "1e3"), ("--seed", str(2**64)),
    ("--max-new-tokens", "0"), ("--max-new-tokens", "nan"), ("--trace-seq", "-1"), ("--read-depth", "0"),
])
def test_generate_values(runtime, tiny, flag, value):
    code, out, err = _gen(runtime, tiny, flag, value)
    assert_one_error(code, err, "moe-runtime", f"argument {flag}")
    assert out == ""


@pytest.mark.parametrize("value", ["auto", "mxfp4", "int3"])
def test_host_dtype_is_a_format_the_host_copy_can_take(runtime, tiny, value):
    code, out, err = _gen(runtime, tiny, "--host-dtype", value)
    assert_one_error(code, err, "moe-runtime", "--host-dtype must be one of float32, bfloat16, float16, int8, int4",
                     repr(value))
    assert out == ""


@pytest.mark.parametrize("ids", ["1,,2", ",1", "1,2,", "1;2", "1,2.5", " ", "1,x"])
def test_prompt_ids_with_empty_or_bad_items(runtime, tiny, ids):
    code, out, err = runtime("generate", "--model", tiny, "--prompt-ids", ids)
    assert_one_error(code, err, "moe-runtime", "--prompt-ids")


def test_prompt_ids_outside_the_vocabulary(runtime, tiny):
    code, _, err = runtime("generate", "--model", tiny, "--prompt-ids", "1,-5")
    assert_one_error(code, err, "moe-runtime", "-5", "vocabulary")


@pytest.mark.parametrize("flag,value", [("--tokens", "0"), ("--tokens", "-3"), ("--seed", "-1"),
                                        ("--skew", "nan"), ("--skew", "inf"), ("--locality", "1.5"),
                                        ("--correlation", "nan"), ("--seq-len", "0"), ("--layers", "0")])
def test_synth_values(trace_cli, tmp_path, flag, value):
    out = precious(tmp_path / "s.npz")
    code, _, err = trace_cli("synth", "--model", "mixtral-8x7b", "--out", out, flag, value)
    assert_one_error(code, err, "moe-trace", f"argument {flag}")
    assert out.read_text() == "precious"


CAL = ["--random-tokens", 64, "--lookahead", 1, "--rank", 2]


@pytest.mark.parametrize("flag,value", [("--refine-lr", "nan"), ("--refine-lr", "0"), ("--refine-lr", "inf"),
                                        ("--ridge", "nan"), ("--ridge", "-1"), ("--holdout", "nan"),
                                        ("--holdout", "2"), ("--seed", "-1"), ("--rank", "0"),
                                        ("--refine-steps", "-1"), ("--random-tokens", "0"), ("--seq-len", "0"),
                                        ("--expert-slots", "0"), ("--lookahead", "nan")])
def test_calibrate_values(runtime, tiny, tmp_path, flag, value):
    out = precious(tmp_path / "a.safetensors")
    code, _, err = runtime("calibrate", "--model", tiny, *CAL, "--out", out, flag, value)
    assert_one_error(code, err, "moe-runtime", f"argument {flag}")
    assert out.read_text() == "precious"


@pytest.mark.parametrize("flag,value", [("--recall", "nan"), ("--recall", "inf"), ("--precision", "-0.1"),
                                        ("--precision", "nan"), ("--recall", "abc"), ("--seed", "-1"),
                                        ("--batch", "0")])
def test_replay_values(sim, flag, value):
    code, out, err = sim("replay", "--trace", LAW, "--device", "t4", "--tokens", 5, "--predictor", "noisy-oracle",
                         flag, value)
    assert_one_error(code, err, "moe-sim", flag.strip("-"))
    assert out == ""


@pytest.mark.parametrize("flag,value", [("--layers", "0"), ("--repeats", "0"), ("--repeats", str(10**9))])
def test_profile_values(runtime, flag, value):
    code, _, err = runtime("profile", "--device", "cpu", "--model-config", "mixtral-8x7b", flag, value)
    assert_one_error(code, err, "moe-runtime", f"argument {flag}")


def test_popularity_trace_of_another_model(runtime, tiny):
    code, _, err = _gen(runtime, tiny, "--eviction", "static", "--popularity-trace", LAW)
    assert_one_error(code, err, "moe-runtime", "--popularity-trace", "(26, 64, 6)", "(2, 8, 2)")


def test_route_from_trace_of_another_model(runtime, tiny):
    code, _, err = _gen(runtime, tiny, "--route-from-trace", LAW)
    assert_one_error(code, err, "moe-runtime", "--route-from-trace", "(26, 64, 6)")


def test_make_tiny_refuses_to_replace_a_checkpoint(runtime, tmp_path):
    ckpt = tmp_path / "ck"
    code, _, err = runtime("make-tiny", "--family", "mixtral", "--out", ckpt)
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    code, _, err = runtime("make-tiny", "--family", "olmoe", "--out", ckpt, "--seed", 3)
    assert_one_error(code, err, "moe-runtime", str(ckpt), "--force")
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    code, _, err = runtime("make-tiny", "--family", "olmoe", "--out", ckpt, "--seed", 3, "--force")
    assert code == 0 and '"olmoe"' in (ckpt / "config.json").read_text()
    from moe_runtime.core.outputs import file_mode
    assert {p.name: p.stat().st_mode & 0o777 for p in ckpt.iterdir()} == {n: file_mode() for n in before}


def test_argparse_refusals_are_one_line(runtime, trace_cli, sim):
    for code, _, err in (runtime("generate"), runtime("nosuch"), trace_cli("info"), sim("replay", "--bogus")):
        assert_one_error(code, err, err.split(":")[0])


def test_model_that_is_a_file_or_a_folder_without_config(runtime, sim, tmp_path):
    """Not "not found" for a path that is there: say what it is instead."""
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    for model, words in [(f, ["is a file, not a checkpoint directory"]), ("/dev/null", ["is a file"]),
                         (tmp_path, ["missing file", "is not a Hugging Face checkpoint"])]:
        code, out, err = runtime("generate", "--model", model, "--prompt", "hi", "--max-new-tokens", 2)
        assert_one_error(code, err, "moe-runtime", str(model), *words)
    for path in ("/dev/null", tmp_path):
        code, out, err = sim("sweep", path)
        assert_one_error(code, err, "moe-sim", "is not a regular file")
