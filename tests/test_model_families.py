"""DeepSeek-V2/V3, GLM-4.5 and GPT-OSS against transformers 5.x on tiny random checkpoints (save_pretrained),
GPT-OSS's MXFP4 experts loaded as stored, and the loader's refusals for these formats."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_checkpoints import hf_model

from moe_runtime.core.errors import MoeError
from moe_runtime.model.checkpoint import load_model
from moe_runtime.model.experts import ResidentExperts
from moe_runtime.model.formats import dequantize_mxfp4, quantize_mxfp4
from moe_runtime.model.generate import generate

PROMPT = [5, 17, 42, 8, 99, 23, 61]
BIASES = ("bias", "e_score_correction_bias")  # zero-initialised by transformers; made random here

CASES = {
    # group_limited_greedy over 4 groups, YaRN with mscale/mscale_all_dim, a dense first layer, q without LoRA
    "deepseek_v2": ("deepseek_v2", {}),
    "deepseek_v2-greedy": ("deepseek_v2", dict(topk_method="greedy", num_experts_per_tok=3, rope_scaling=None)),
    # sigmoid routing with a non-zero e_score_correction_bias, q through q_lora_rank, interleaved RoPE
    "deepseek_v3": ("deepseek_v3", dict(nonzero=BIASES)),
    "deepseek_v3-no-interleave": ("deepseek_v3", dict(nonzero=BIASES, rope_interleave=False, n_group=1,
                                                      topk_group=1, norm_topk_prob=False)),
    "glm4_moe": ("glm4_moe", dict(nonzero=BIASES)),
    # sinks, router and expert biases, q/k/v/o biases, a window (3) shorter than the prompt, clamping that bites
    "gpt_oss": ("gpt_oss", dict(nonzero=BIASES, swiglu_limit=0.3, seed=1)),
}


def ours(path, **kw):
    model, store = load_model(path, "cpu", **kw)
    return model, store, ResidentExperts(store, "cpu")


def prompt_logits(model, provider, ids=PROMPT):
    model.setup_cache(len(ids) + 4)
    with torch.inference_mode():
        return model(torch.tensor(ids), torch.arange(len(ids)), provider)  # [T, V]


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_tokens_match_transformers(tiny_checkpoint, case):
    family, overrides = CASES[case]
    path = tiny_checkpoint(family, **overrides)
    model, store, provider = ours(path)
    hf = hf_model(path)
    with torch.inference_mode():
        ref = hf(torch.tensor([PROMPT])).logits[0]  # [T, V]
        hf_tokens = hf.generate(torch.tensor([PROMPT]), max_new_tokens=20, do_sample=False)[0, len(PROMPT):]
    torch.testing.assert_close(prompt_logits(model, provider), ref, atol=1e-4, rtol=1e-4)
    res = generate(model, provider, PROMPT, 20, eos_ids=model.cfg.eos_token_ids)
    assert res.token_ids == hf_tokens.tolist() and len(res.token_ids) == 20
    assert list(store.model_layers) == [i for i, layer in enumerate(hf.model.layers)
                                        if hasattr(layer.mlp, "experts")]


def test_zeroed_biases_would_change_the_output(tiny_checkpoint, tmp_path):
    """The gpt_oss and deepseek_v3 cases above test biases that matter: zeroing them moves the logits."""
    for family in ("gpt_oss", "deepseek_v3"):
        src = tiny_checkpoint(family, **CASES[family][1])
        sd = load_file(str(src / "model.safetensors"))
        keys = [k for k in sd if "experts.down_proj_bias" in k or "e_score_correction_bias" in k]
        assert keys and all(sd[k].abs().sum() > 0 for k in keys)
        save_file({k: torch.zeros_like(v) if k in keys else v for k, v in sd.items()},
                  str(tmp_path / "model.safetensors"))
        (tmp_path / "config.json").write_text((src / "config.json").read_text())
        a, b = prompt_logits(*ours(src)[::2]), prompt_logits(*ours(tmp_path)[::2])
        assert not torch.allclose(a, b, atol=1e-3)


def test_mla_caches_the_latent_and_rope_key_only(tiny_checkpoint):
    model, _, provider = ours(tiny_checkpoint("deepseek_v2"))
    model.setup_cache(11)
    cfg = model.cfg
    for layer in model.layers:
        attn = layer.self_attn
        assert attn.kv_cache.shape == (1, 11, cfg.kv_lora_rank) and attn.pe_cache.shape == (1, 11, cfg.qk_rope_head_dim)
        assert not hasattr(attn, "k_cache")
    per_token = sum(t.numel() for layer in model.layers for t in (layer.self_attn.kv_cache, layer.self_attn.pe_cache))
    assert per_token == 11 * cfg.n_layers * cfg.kv_elements_per_token() == 11 * 2 * (16 + 4)
    # expanded heads would hold n_heads x (nope + rope + v) per token and layer: 4 x 20 = 80, not 20
    assert cfg.kv_elements_per_token() < cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)


def test_deepseek_v3_mtp_layer_in_the_checkpoint_is_ignored(tiny_checkpoint, tmp_path):
    """Real V3 checkpoints carry the multi-token-prediction layer as model.layers.{N}.*: loading ignores it."""
    src = tiny_checkpoint("deepseek_v3", **CASES["deepseek_v3"][1])
    sd = load_file(str(src / "model.safetensors"))
    n = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    mtp = {k.replace("model.layers.1.", f"model.layers.{n}."): v.clone() for k, v in sd.items()
           if k.startswith("model.layers.1.")}
    mtp[f"model.layers.{n}.eh_proj.weight"] = torch.randn(32, 64)
    mtp[f"model.layers.{n}.enorm.weight"] = torch.ones(32)
    save_file({**sd, **mtp}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    torch.testing.assert_close(prompt_logits(*ours(tmp_path)[::2]), prompt_logits(*ours(src)[::2]), atol=0, rtol=0)


# ---- GPT-OSS MXFP4 ---------------------------------------------------------------------------

def mxfp4_checkpoint(src, out):
    """Rewrite a float gpt_oss checkpoint with MXFP4 experts (*_blocks/*_scales as real checkpoints store
    them); also write the same weights dequantized, as floats, to ``out/dequant``. Returns (mxfp4, dequant)."""
    sd = load_file(str(src / "model.safetensors"))
    quant, deq = {}, {}
    for k, v in sd.items():
        if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj"):
            rows = v.transpose(1, 2)  # [E, out, in]: MXFP4 blocks run along the input dimension
            qs = [quantize_mxfp4(r) for r in rows]
            blocks, scales = torch.stack([q.blocks for q in qs]), torch.stack([q.scales for q in qs])
            quant[k + "_blocks"], quant[k + "_scales"] = blocks, scales
            deq[k] = dequantize_mxfp4(blocks, scales, torch.float32).transpose(1, 2).contiguous()
        else:
            quant[k] = deq[k] = v
    cfg = json.loads((src / "config.json").read_text())
    for d, tensors, extra in ((out / "mxfp4", quant, {"quantization_config": {"quant_method": "mxfp4"}}),
                              (out / "dequant", deq, {})):
        d.mkdir(parents=True)
        save_file(tensors, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({**cfg, **extra}))
    return out / "mxfp4", out / "dequant"


@pytest.fixture(scope="module")
def mxfp4(tiny_checkpoint, tmp_path_factory):
    src = tiny_checkpoint("gpt_oss", **CASES["gpt_oss"][1])
    return mxfp4_checkpoint(src, tmp_path_factory.mktemp("mxfp4"))


def test_mxfp4_experts_stay_mxfp4_and_match_the_dequantized_weights(mxfp4):
    q_path, d_path = mxfp4
    model, store, provider = ours(q_path)
    assert store.layout.codec == "mxfp4" and store.layout.dtype == torch.uint8
    h, i = model.cfg.hidden_size, model.cfg.moe_intermediate_size
    weights = 3 * h * i
    assert store.layout.nbytes < weights * 4.25 / 8 + 3 * 16 + (2 * i + h) * 4 + 6 * 16  # ~4.25 bits, biases fp32
    dmodel, dstore, dprovider = ours(d_path)
    for m in range(store.n_moe_layers):
        for e in range(store.n_experts):
            a = store.layout.dense(store.weights(m, e))
            b = dstore.layout.dense(dstore.weights(m, e))
            for x, y in zip(a, b):
                assert torch.equal(x, y)
    got = prompt_logits(model, provider)
    torch.testing.assert_close(got, prompt_logits(dmodel, dprovider), atol=0, rtol=0)
    assert generate(model, provider, PROMPT, 12).token_ids == generate(dmodel, dprovider, PROMPT, 12).token_ids


def test_mxfp4_matches_transformers_dequantizing_loader(mxfp4):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    q_path, _ = mxfp4
    hf = AutoModelForCausalLM.from_pretrained(q_path, dtype=torch.float32, attn_implementation="eager",
                                              quantization_config=Mxfp4Config(dequantize=True)).eval()
    model, _, provider = ours(q_path)
    with torch.inference_mode():
        ref = hf(torch.tensor([PROMPT])).logits[0]
        hf_tokens = hf.generate(torch.tensor([PROMPT]), max_new_tokens=20, do_sample=False)[0, len(PROMPT):]
    torch.testing.assert_close(prompt_logits(model, provider), ref, atol=1e-4, rtol=1e-4)
    assert generate(model, provider, PROMPT, 20).token_ids == hf_tokens.tolist()


def test_mxfp4_converts_to_other_expert_dtypes(mxfp4):
    q_path, d_path = mxfp4
    for dt in ("float32", "int8"):
        a = prompt_logits(*ours(q_path, expert_dtype=dt)[::2])
        b = prompt_logits(*ours(d_path, expert_dtype=dt)[::2])
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # via the same dequantized weights


def _rewrite(path, out, edit_tensors=None, edit_config=None):
    sd = load_file(str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    save_file(edit_tensors(sd) if edit_tensors else sd, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(edit_config(cfg) if edit_config else cfg))
    return out


def test_bad_quantized_checkpoints_are_one_line_errors(mxfp4, tmp_path):
    q_path, _ = mxfp4
    key = "model.layers.0.mlp.experts.down_proj_scales"

    def nan_scale(sd):
        sd[key] = sd[key].clone()
        sd[key][0, 0, 0] = 255
        return sd

    def short_blocks(sd):
        sd[key.replace("scales", "blocks")] = sd[key.replace("scales", "blocks")][..., :8].contiguous()
        return sd

    cases = {
        "nan": (_rewrite(q_path, tmp_path / "nan", nan_scale), "0xFF"),
        "shape": (_rewrite(q_path, tmp_path / "shape", short_blocks), "down_proj_blocks has shape"),
        "fp8": (_rewrite(q_path, tmp_path / "fp8", edit_config=lambda c: {
            **c, "quantization_config": {"quant_method": "fp8"}}), "quantization 'fp8' is not supported"),
        "float-as-mxfp4": (_rewrite(q_path, tmp_path / "f", lambda sd: {
            **sd, key: sd[key].float()}), "MXFP4 blocks and scales are U8"),
    }
    for name, (path, words) in cases.items():
        with pytest.raises(MoeError, match=words) as err:
            load_model(path)
        assert "\n" not in str(err.value), name


def test_mxfp4_is_refused_for_a_family_without_it(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("deepseek_v3", **CASES["deepseek_v3"][1])
    path = _rewrite(src, tmp_path / "q", edit_config=lambda c: {**c, "quantization_config": {"quant_method": "mxfp4"}})
    with pytest.raises(MoeError, match="quantization 'mxfp4' is not supported for deepseek_v3"):
        load_model(path)


def test_behaviour_follows_the_familys_named_fields():
    """Expert biases, the checkpoint's expert layout and the activation are named fields of the family,
    read where they are used; no module compares one family's field value to stand for the family."""
    import re
    from pathlib import Path

    from moe_runtime.core.families import FAMILIES
    from moe_runtime.core.model_config import ModelConfig
    from moe_runtime.core.shapes import ModelSpec
    from moe_runtime.model.formats import format_for
    from moe_runtime.model.tiny import tiny_config_dict

    for name, fam in FAMILIES.items():
        cfg = ModelConfig.from_hf_dict(tiny_config_dict(name))
        assert cfg.expert_biases == fam.expert_biases and cfg.expert_activation == fam.expert_activation
        fmt = format_for(cfg, "float32", torch.float32)
        assert (fmt.biases, fmt.activation) == (fam.expert_biases, fam.expert_activation)
        assert ModelSpec.from_config(cfg, name, "float32").expert_biases == fam.expert_biases
    assert [n for n, f in FAMILIES.items() if f.expert_biases] == ["gpt_oss"]
    root = Path(__file__).resolve().parent.parent
    stand_ins = re.compile(r'(expert_activation|model_type|family)\s*[!=]=\s*["\']')
    found = [f"{p.relative_to(root)}:{i}" for base in ("moe_runtime", "simulator", "benchmarks")
             for p in (root / base).rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
             if stand_ins.search(line)]
    assert found == []
