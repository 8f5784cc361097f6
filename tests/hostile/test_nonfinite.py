"""Non-finite numbers in a model: a decode whose logits become NaN/inf stops with one line instead of printing
garbage with exit 0; non-finite weights are refused at load (experts on disk: at their first read), naming the tensor."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_runtime.core.errors import MoeError
from moe_runtime.model.checkpoint import load_model
from moe_runtime.model.experts import ResidentExperts
from moe_runtime.model.generate import generate

from .conftest import assert_one_error

EXPERT = "model.layers.0.block_sparse_moe.experts.3.w1.weight"
ATTN = "model.layers.1.self_attn.q_proj.weight"


def _poisoned(tiny, tmp_path, name: str, value: float, where=(0, 0)):
    """A copy of the tiny checkpoint with one element of tensor ``name`` set to ``value``."""
    ck = tmp_path / "poisoned"
    shutil.copytree(tiny, ck)
    tensors = load_file(ck / "model.safetensors")
    tensors[name][where] = value
    save_file(tensors, ck / "model.safetensors", metadata={"format": "pt"})
    return ck


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_stop_the_decode(tiny, temperature, value):
    model, store = load_model(tiny, "cpu")
    with torch.no_grad():
        model.lm_head.weight[5] = value  # one vocabulary row: argmax alone would pick it silently
    with pytest.raises(MoeError, match=r"logits became non-finite \((nan|inf)\) at (the prefill|decode step \d+);"):
        generate(model, ResidentExperts(store, "cpu"), [1, 2, 3], 4, temperature)


def test_non_finite_logits_through_the_cli(runtime, tiny, tmp_path):
    ck = _poisoned(tiny, tmp_path, "lm_head.weight", float("nan"))
    code, out, err = runtime("generate", "--model", ck, "--prompt-ids", "1,2,3", "--max-new-tokens", 4)
    assert_one_error(code, err, "moe-runtime")  # today the logits check; with the load check, that one
    assert out == ""


@pytest.mark.parametrize("name,value", [(EXPERT, float("nan")), (ATTN, float("inf")), (ATTN, float("-inf")),
                                        ("model.embed_tokens.weight", float("nan")),
                                        ("model.layers.0.input_layernorm.weight", float("nan"))],
                         ids=["expert-nan", "attn-inf", "attn-neginf", "embed-nan", "norm-nan"])
def test_non_finite_weights_are_refused_at_load_naming_the_tensor(runtime, tiny, tmp_path, name, value):
    where = (0,) if name.endswith("layernorm.weight") else (0, 0)
    ck = _poisoned(tiny, tmp_path, name, value, where)
    code, out, err = runtime("generate", "--model", ck, "--prompt-ids", "1,2,3", "--max-new-tokens", 4)
    assert_one_error(code, err, "moe-runtime", name, "non-finite")
    assert out == ""


def test_non_finite_expert_is_refused_with_experts_on_disk(runtime, tiny, tmp_path):
    """Experts that stay on storage are checked on first read (or when packed)."""
    ck = _poisoned(tiny, tmp_path, EXPERT, float("nan"))
    code, out, err = runtime("generate", "--model", ck, "--prompt-ids", "1,2,3", "--max-new-tokens", 4,
                             "--expert-source", "disk", "--expert-budget", "100%")
    assert_one_error(code, err, "moe-runtime", "experts.3", "non-finite")


def test_non_finite_bf16_weights_are_refused(runtime, tiny, tmp_path):
    ck = tmp_path / "bf16"
    shutil.copytree(tiny, ck)
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(ck / "model.safetensors").items()}
    tensors[ATTN][0, 0] = float("nan")
    save_file(tensors, ck / "model.safetensors", metadata={"format": "pt"})
    code, out, err = runtime("generate", "--model", ck, "--prompt-ids", "1,2,3", "--max-new-tokens", 4)
    assert_one_error(code, err, "moe-runtime", ATTN, "non-finite")


def test_trust_weights_skips_the_load_check(runtime, tiny, tmp_path):
    """--trust-weights skips the pass over the weights; the poisoned decode is then stopped by its logits."""
    ck = _poisoned(tiny, tmp_path, ATTN, float("nan"), (0, 0))
    code, out, err = runtime("generate", "--model", ck, "--prompt-ids", "1,2,3", "--max-new-tokens", 4,
                             "--trust-weights")
    assert_one_error(code, err, "moe-runtime", "logits", "non-finite")
