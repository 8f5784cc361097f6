"""ModelSpec: bundled configs, derived sizes, HF configs, validation errors."""

import pytest

from moe_runtime.core.errors import MoeError
from moe_runtime.core.shapes import ModelSpec, available_models, load_model_spec
from moe_runtime.traces import TraceMeta

MIXTRAL_HF = {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
              "num_local_experts": 8, "num_experts_per_tok": 2, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": 32000, "num_hidden_layers": 32,
              "torch_dtype": "bfloat16"}


def test_bundled_specs_load_with_published_totals():
    assert set(available_models()) >= {"deepseek-v2-lite", "mixtral-8x7b", "olmoe-1b-7b",
                                       "qwen3-30b-a3b", "qwen1.5-moe-a2.7b"}
    mix = load_model_spec("mixtral-8x7b")
    assert mix.expert_bytes == 3 * 4096 * 14336 * 2 == 352_321_536
    assert mix.n_moe_layers == 32 and mix.moe_layers == tuple(range(32))
    assert round(mix.total_bytes / 2 / 1e9, 1) == 46.7  # Mixtral's published 46.7B parameters
    ds = load_model_spec("deepseek-v2-lite")
    assert ds.moe_layers == tuple(range(1, 27)) and ds.dense_layers == (0,)
    assert ds.expert_bytes == 3 * 2048 * 1408 * 2 == 17_301_504  # "about 17.3 MB" in the data README
    assert ds.total_expert_bytes == 17_301_504 * 64 * 26
    q3 = load_model_spec("qwen3-30b-a3b")
    assert round(q3.total_bytes / 2 / 1e9, 1) == 30.5  # Qwen3-30B-A3B: 30.5B parameters
    assert load_model_spec("olmoe-1b-7b").dtype_bytes == 4


def test_flops_and_dense_bytes_hand_computed():
    s = ModelSpec(name="t", n_layers=2, moe_layers=(1,), n_experts=4, top_k=2, hidden_size=8,
                  moe_intermediate_size=4, n_heads=2, n_kv_heads=1, head_dim=4, vocab_size=10,
                  dtype="float16", n_shared_experts=1, shared_intermediate_size=6,
                  dense_intermediate_size=16)
    assert s.attention_params == 8 * 8 * 2 + 8 * 4 * 2 == 192
    assert s.dense_bytes_per_layer == (192 + 3 * 8 * 6 + 16 + 32) * 2
    assert s.expert_flops_per_token == 2 * 3 * 8 * 4 == 192
    assert s.attention_flops_per_token(10) == 2 * 192 + 4 * 2 * 4 * 10
    assert s.moe_layer_flops_per_token(0) == 384 + (2 * 3 * 8 * 6 + 2 * 8 * 4) + 2 * 192
    assert s.kv_bytes_per_token() == 2 * 1 * 4 * 2 * 2
    meta = TraceMeta.for_spec(s, "unit")
    assert (meta.n_layers, meta.n_experts, meta.top_k, meta.expert_bytes) == (1, 4, 2, 3 * 8 * 4 * 2)


def test_from_hf_config_families():
    mix = ModelSpec.from_hf_config(MIXTRAL_HF, name="mixtral-8x7b")
    assert mix == load_model_spec("mixtral-8x7b")
    qwen = ModelSpec.from_hf_config({
        "model_type": "qwen2_moe", "hidden_size": 2048, "intermediate_size": 5632,
        "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632, "num_experts": 60,
        "num_experts_per_tok": 4, "num_attention_heads": 16, "num_key_value_heads": 16,
        "vocab_size": 151936, "num_hidden_layers": 24, "torch_dtype": "bfloat16",
        "decoder_sparse_step": 1, "mlp_only_layers": []}, name="qwen1.5-moe-a2.7b")
    assert qwen == load_model_spec("qwen1.5-moe-a2.7b")
    q3 = ModelSpec.from_hf_config({
        "model_type": "qwen3_moe", "hidden_size": 64, "intermediate_size": 128,
        "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 100,
        "num_hidden_layers": 6, "dtype": "float32", "decoder_sparse_step": 2, "mlp_only_layers": [3]})
    assert q3.moe_layers == (1, 5) and q3.dense_intermediate_size == 128 and q3.head_dim == 32
    olmoe = ModelSpec.from_hf_config({**MIXTRAL_HF, "model_type": "olmoe", "num_experts": 64,
                                      "num_experts_per_tok": 8, "intermediate_size": 1024,
                                      "hidden_size": 2048, "num_attention_heads": 16,
                                      "num_key_value_heads": 16})
    assert olmoe.n_experts == 64 and olmoe.head_dim == 128
    with pytest.raises(MoeError, match="unsupported model_type 'llama'"):
        ModelSpec.from_hf_config({"model_type": "llama"})
    with pytest.raises(MoeError, match="missing field 'num_local_experts'"):
        ModelSpec.from_hf_config({k: v for k, v in MIXTRAL_HF.items() if k != "num_local_experts"})
    with pytest.raises(MoeError, match="dtype must be one of"):
        ModelSpec.from_hf_config({**MIXTRAL_HF, "torch_dtype": "int4"})


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_family_table_drives_parsing_spec_and_tensor_names(family):
    """One table entry per family: its tiny config parses, and the HF spec is derived from the parsed config."""
    from moe_runtime.core.model_config import ModelConfig
    from moe_runtime.core.families import FAMILIES

    fam = FAMILIES[family]
    d = {"model_type": family, "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts_per_tok": 2, "torch_dtype": "bfloat16",
         **fam.tiny_config}
    cfg = ModelConfig.from_hf_dict(d)
    spec = ModelSpec.from_hf_config(d, name="t")
    assert spec == ModelSpec.from_config(cfg, "t", "bfloat16")
    assert (cfg.n_layers, cfg.n_moe_layers, spec.n_layers, spec.n_moe_layers, cfg.n_experts) == (3, 3, 3, 3, 8)
    assert spec.expert_bytes == 3 * 64 * cfg.moe_intermediate_size * 2
    switches = {"mixtral": (True, True, "none", False), "qwen2_moe": (False, False, "none", True),
                "qwen3_moe": (True, False, "head", False), "olmoe": (False, False, "full", False)}
    assert (cfg.norm_topk_prob, cfg.route_weights_fp32, cfg.qk_norm, cfg.qkv_bias) == switches[family]
    assert spec.shared_intermediate_size == (96 if family == "qwen2_moe" else 0)
    w1, w3, w2 = fam.names.per_expert(2, 5)
    router = fam.names.dense("layers.2.mlp.gate.weight", classic=True)
    if family == "mixtral":
        assert (w1, w2, router) == ("model.layers.2.block_sparse_moe.experts.5.w1.weight",
                                    "model.layers.2.block_sparse_moe.experts.5.w2.weight",
                                    "model.layers.2.block_sparse_moe.gate.weight")
    else:
        assert (w1, w3, router) == ("model.layers.2.mlp.experts.5.gate_proj.weight",
                                    "model.layers.2.mlp.experts.5.up_proj.weight", "model.layers.2.mlp.gate.weight")
    assert fam.names.fused(2) == ("model.layers.2.mlp.experts.gate_up_proj", "model.layers.2.mlp.experts.down_proj")


def test_synthetic_family_of_bundled_specs():
    from moe_runtime.core.families import synthetic_family

    want = {"deepseek-v2-lite": "qwen2_moe", "mixtral-8x7b": "mixtral", "olmoe-1b-7b": "olmoe",
            "qwen1.5-moe-a2.7b": "qwen2_moe", "qwen3-30b-a3b": "qwen3_moe"}
    assert {n: synthetic_family(n, load_model_spec(n).n_shared_experts > 0).model_type for n in want} == want
    assert synthetic_family("some-new-model", False).model_type == "qwen3_moe"


@pytest.mark.parametrize("text, message", [
    ("name: x\nn_layers: 2\n", "missing field\\(s\\): n_experts"),
    ("[1, 2]\n", "must be a mapping"),
    ("name: x\nn_layers: [\n", "not valid YAML"),
    ("{base}bogus: 1\n", "unknown field\\(s\\): bogus"),
    ("{base}moe_layers: [0, 5]\n", "moe_layers must lie in \\[0, 2\\)"),
    ("{base}moe_layers: [1, 1]\n", "strictly increasing"),
    ("{base}first_moe_layer: 1\n", "dense_intermediate_size is needed"),
    ("{base_top}top_k: 9\nfirst_moe_layer: 0\n", "top_k=9 exceeds n_experts=4"),
    ("{base}first_moe_layer: 0\ndtype2: x\n", "unknown field"),
])
def test_yaml_errors_name_file_and_field(tmp_path, text, message):
    base_top = ("name: x\nn_layers: 2\nn_experts: 4\nhidden_size: 8\nmoe_intermediate_size: 4\n"
                "n_heads: 2\nvocab_size: 10\ndtype: bfloat16\n")
    base = base_top + "top_k: 2\n"
    path = tmp_path / "m.yaml"
    path.write_text(text.format(base=base, base_top=base_top))
    with pytest.raises(MoeError, match=f"m.yaml: .*{message}"):
        load_model_spec(path)


def test_unknown_name_and_missing_file():
    with pytest.raises(MoeError, match="unknown model 'nope' \\(known: deepseek-v2-lite"):
        load_model_spec("nope")
    with pytest.raises(MoeError, match="model spec file not found"):
        load_model_spec("/no/such/file.yaml")
