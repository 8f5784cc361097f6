"""Bad checkpoints and bad CLI input give one clear MoeError line, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from moe_runtime.model.checkpoint import load_model
from moe_runtime.core.errors import MoeError
from moe_runtime.model.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("good"), seed=0)


@pytest.fixture
def ckpt(good, tmp_path):
    """A fresh, writable copy of the good checkpoint."""
    for f in good.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    return tmp_path


def edit_config(path, **changes):
    d = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            d.pop(k)
        else:
            d[k] = v
    (path / "config.json").write_text(json.dumps(d))


def edit_tensors(path, fn):
    sd = load_file(str(path / "model.safetensors"))
    fn(sd)
    save_file(sd, str(path / "model.safetensors"))


def expect(path, *words):
    with pytest.raises(MoeError) as e:
        load_model(path, "cpu")
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_missing_directory(tmp_path):
    expect(tmp_path / "nope", "model directory not found")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    expect(ckpt, "missing file", "config.json")


def test_unparsable_config(ckpt):
    (ckpt / "config.json").write_text("{not json")
    expect(ckpt, "cannot parse", "config.json")


def test_unsupported_model_type(ckpt):
    edit_config(ckpt, model_type="llama")
    expect(ckpt, "unsupported model_type 'llama'")


@pytest.mark.parametrize("field", ["hidden_size", "num_experts_per_tok", "num_local_experts", "vocab_size"])
def test_missing_config_field(ckpt, field):
    edit_config(ckpt, **{field: ...})
    expect(ckpt, "missing field", field)


def test_bad_config_values(ckpt):
    edit_config(ckpt, num_key_value_heads=3)
    expect(ckpt, "num_attention_heads (4) is not a multiple of num_key_value_heads (3)")
    edit_config(ckpt, num_key_value_heads=2, num_experts_per_tok=9)
    expect(ckpt, "num_experts_per_tok (9) exceeds")
    edit_config(ckpt, num_experts_per_tok=2, hidden_size="64")
    expect(ckpt, "hidden_size must be an integer")
    edit_config(ckpt, hidden_size=64, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4})
    expect(ckpt, "rope_type 'yarn' is not supported")


def test_missing_safetensors(ckpt):
    (ckpt / "model.safetensors").unlink()
    expect(ckpt, "no model.safetensors or model.safetensors.index.json")


def test_unreadable_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # truncated
    expect(ckpt, "cannot read safetensors file", "model.safetensors")
    f.write_bytes(b"\x07\x00\x00\x00\x00\x00\x00\x00garbage")
    expect(ckpt, "cannot read safetensors file", "model.safetensors")


def test_missing_dense_tensor(ckpt):
    edit_tensors(ckpt, lambda sd: sd.pop("model.layers.1.self_attn.k_proj.weight"))
    expect(ckpt, "missing tensor model.layers.1.self_attn.k_proj.weight")


def test_missing_expert_tensor(ckpt):
    edit_tensors(ckpt, lambda sd: sd.pop("model.layers.0.block_sparse_moe.experts.5.w3.weight"))
    expect(ckpt, "missing tensor model.layers.0.block_sparse_moe.experts.5.w3.weight")


def test_misshaped_tensors(ckpt):
    def shrink(sd):
        sd["model.layers.0.block_sparse_moe.experts.2.w2.weight"] = sd[
            "model.layers.0.block_sparse_moe.experts.2.w2.weight"][:, :10].contiguous()

    edit_tensors(ckpt, shrink)
    expect(ckpt, "model.layers.0.block_sparse_moe.experts.2.w2.weight has shape [64, 10], expected [64, 96]")
    edit_tensors(ckpt, lambda sd: sd.update({"lm_head.weight": sd["lm_head.weight"][:50].contiguous()}))
    expect(ckpt, "lm_head.weight has shape [50, 64]")


def test_unsupported_tensor_dtype(ckpt):
    import torch

    key = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    edit_tensors(ckpt, lambda sd: sd.update({key: sd[key].to(torch.float8_e4m3fn)}))
    expect(ckpt, f"{key} has dtype F8_E4M3")


def test_sharded_index_naming_missing_shard(ckpt):
    names = list(load_file(str(ckpt / "model.safetensors")))
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00002.safetensors")
    wm = {n: "model-00001-of-00002.safetensors" for n in names}
    wm[names[0]] = "model-00002-of-00002.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    expect(ckpt, "missing checkpoint shard", "model-00002-of-00002.safetensors")
    (ckpt / "model.safetensors.index.json").write_text("[]")
    expect(ckpt, "cannot parse", "model.safetensors.index.json")


def test_cuda_requested_without_cuda(good):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(MoeError, match="CUDA is not available"):
        load_model(good, "cuda")


# -- the CLI, as a user runs it --

def cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "moe_runtime.cli.runtime", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=120)


def test_cli_generate_json(good):
    r = cli("generate", "--model", good, "--prompt", "Hi there", "--max-new-tokens", 6, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"token_ids", "text", "sequences", "prefill_s", "decode_s", "tokens_per_s"}
    assert out["sequences"] == [{"token_ids": out["token_ids"], "text": out["text"]}]
    assert 1 <= len(out["token_ids"]) <= 6 and all(isinstance(t, int) for t in out["token_ids"])
    assert out["prefill_s"] > 0 and out["tokens_per_s"] >= 0 and isinstance(out["text"], str)
    # greedy decoding is deterministic and --prompt-ids gives the same as the tokenized text
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(good / "tokenizer.json")).encode("Hi there").ids
    r2 = cli("generate", "--model", good, "--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens", 6, "--json")
    assert json.loads(r2.stdout)["token_ids"] == out["token_ids"]


@pytest.mark.parametrize("args, message", [
    (["--model", "{missing}", "--prompt-ids", "1,2"], "model directory not found"),
    (["--model", "{notok}", "--prompt", "hello"], "--prompt needs"),
    (["--model", "{good}", "--prompt-ids", "1,x"], "--prompt-ids must be comma-separated integers"),
    (["--model", "{good}", "--prompt-ids", "1,500"], "prompt token id 500 outside the vocabulary"),
])
def test_cli_errors_are_one_line(good, tmp_path, args, message):
    notok = tmp_path / "notok"
    notok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (notok / f).write_bytes((good / f).read_bytes())
    paths = dict(missing=tmp_path / "missing", notok=notok, good=good)
    r = cli("generate", *[a.format(**paths) for a in args], "--max-new-tokens", 2)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("moe-runtime: error: ") and message in r.stderr
