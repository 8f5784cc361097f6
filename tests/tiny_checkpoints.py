"""Tiny random HF checkpoints for tests, written by transformers' own save_pretrained (the reference).

``make_tiny_checkpoint(family, path, **overrides) -> Path`` writes a seeded
float32 checkpoint of ``family`` ('mixtral', 'qwen2_moe', 'qwen3_moe',
'olmoe', 'deepseek_v2', 'deepseek_v3', 'glm4_moe', 'gpt_oss') into directory ``path`` and returns it. ``overrides`` are HF config
kwargs (e.g. ``num_experts_per_tok=3``, ``mlp_only_layers=[1]``) plus:

- ``seed`` (default 0): torch seed for the random init;
- ``dtype`` ("float32", "bfloat16", "float16"): dtype the weights are saved in;
- ``max_shard_size`` (e.g. "20KB"): shard the safetensors file;
- ``nonzero`` (e.g. ``("bias", "e_score_correction_bias")``): parameters and
  buffers whose names contain one of these and that transformers initialises
  to zero get random values instead, so the test sees them.

``hf_model(path, dtype)`` loads the same checkpoint into transformers
(eager attention) for comparisons. Tests that must not import transformers can
use ``moe_runtime.model.tiny.write_tiny_checkpoint`` instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

# small enough for a few seconds per test on 2 cores, big enough to route unevenly:
# GQA 4 heads : 2 KV heads, 8 experts, vocab 100
COMMON = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              num_experts_per_tok=2, max_position_embeddings=256, initializer_range=0.2,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
FAMILY = {
    "mixtral": dict(intermediate_size=48, num_local_experts=8),
    "qwen2_moe": dict(intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                      num_experts=8, norm_topk_prob=False),
    "qwen3_moe": dict(intermediate_size=64, moe_intermediate_size=24, num_experts=8, head_dim=16,
                      norm_topk_prob=True),
    "olmoe": dict(intermediate_size=24, num_experts=8, norm_topk_prob=False),
    # MLA: every head expands its own K/V from the latent, so num_key_value_heads = num_attention_heads
    "deepseek_v2": dict(intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=2,
                        num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
                        qk_rope_head_dim=4, v_head_dim=8, first_k_dense_replace=1,
                        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5,
                        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64,
                                          beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707)),
    "deepseek_v3": dict(intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=1,
                        num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=12, qk_nope_head_dim=8,
                        qk_rope_head_dim=4, v_head_dim=8, first_k_dense_replace=1, n_group=4, topk_group=2,
                        routed_scaling_factor=2.5, norm_topk_prob=True),
    "glm4_moe": dict(intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=1,
                     first_k_dense_replace=1, head_dim=16, n_group=2, topk_group=1, attention_bias=True,
                     use_qk_norm=True),
    "gpt_oss": dict(intermediate_size=32, num_local_experts=8, head_dim=8, sliding_window=3,
                    layer_types=["sliding_attention", "full_attention"],
                    rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0,
                                         beta_slow=1.0, truncate=False, original_max_position_embeddings=64)),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_tiny_checkpoint(family: str, path: str | Path, **overrides) -> Path:
    """Write a tiny random checkpoint with transformers' save_pretrained; see the module docstring."""
    from transformers import AutoConfig, AutoModelForCausalLM

    seed = overrides.pop("seed", 0)
    dtype = overrides.pop("dtype", "float32")
    shard = overrides.pop("max_shard_size", None)
    nonzero = overrides.pop("nonzero", ())
    cfg = AutoConfig.for_model(family, **{**COMMON, **FAMILY[family], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if any(n in name for n in nonzero) and not t.any():
                t.normal_(0.0, 0.2)
    model = model.to(DTYPES[dtype])
    path = Path(path)
    kw = {} if shard is None else {"max_shard_size": shard}
    model.save_pretrained(path, **kw)
    return path


def hf_model(path: str | Path, dtype: str = "float32"):
    """The checkpoint loaded by transformers with eager attention, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], attn_implementation="eager").eval()
