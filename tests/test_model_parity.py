"""Our model against transformers 5.x on tiny random checkpoints written by save_pretrained."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_checkpoints import hf_model

from moe_runtime.model.checkpoint import load_model
from moe_runtime.model.experts import ExpertLayout, HostExpertStore, ResidentExperts
from moe_runtime.model.generate import generate
from moe_runtime.model.tiny import write_tiny_checkpoint

PROMPT = [5, 17, 42, 8, 99, 23, 61]

# (family, overrides): GQA 4:2 everywhere, top-k 2..4, dense layers, q/k norms, clipping, shared expert
CASES = {
    "mixtral": ("mixtral", {}),
    "mixtral-top3": ("mixtral", dict(num_experts_per_tok=3, num_key_value_heads=1)),
    "mixtral-sliding-window": ("mixtral", dict(sliding_window=4, num_experts_per_tok=4)),
    "qwen2_moe-dense-layer": ("qwen2_moe", dict(num_hidden_layers=3, mlp_only_layers=[1], num_experts_per_tok=4)),
    "qwen2_moe-sparse-step": ("qwen2_moe", dict(decoder_sparse_step=2, norm_topk_prob=True)),
    "qwen3_moe": ("qwen3_moe", dict(num_experts_per_tok=4)),
    "qwen3_moe-mlp-only": ("qwen3_moe", dict(num_hidden_layers=3, mlp_only_layers=[0], norm_topk_prob=False)),
    "olmoe": ("olmoe", dict(num_experts_per_tok=3)),
    "olmoe-clip": ("olmoe", dict(clip_qkv=0.3, norm_topk_prob=True)),
}


def ours(path, dtype=None):
    model, store = load_model(path, "cpu", dtype)
    return model, store, ResidentExperts(store, "cpu")


def prompt_logits(model, provider, ids=PROMPT, route=None):
    model.setup_cache(len(ids) + 4)
    with torch.inference_mode():
        return model(torch.tensor(ids), torch.arange(len(ids)), provider, route=route)  # [T, V]


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_tokens_match_transformers(tiny_checkpoint, case):
    family, overrides = CASES[case]
    path = tiny_checkpoint(family, **overrides)
    model, store, provider = ours(path)
    hf = hf_model(path)
    with torch.inference_mode():
        ref = hf(torch.tensor([PROMPT])).logits[0]  # [T, V]
        hf_tokens = hf.generate(torch.tensor([PROMPT]), max_new_tokens=20, do_sample=False)[0, len(PROMPT):]
    got = prompt_logits(model, provider)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    res = generate(model, provider, PROMPT, 20, eos_ids=model.cfg.eos_token_ids)
    assert res.token_ids == hf_tokens.tolist()
    assert len(res.token_ids) == 20  # no early EOS: the comparison covers every step
    # the same layers are sparse as in transformers (qwen's mlp_only_layers / decoder_sparse_step)
    assert list(store.model_layers) == [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")]


def test_router_access_matches_hf_router_logits(tiny_checkpoint):
    path = tiny_checkpoint("qwen2_moe", num_hidden_layers=3, mlp_only_layers=[1], num_experts_per_tok=4)
    model, store, provider = ours(path)
    assert store.model_layers == (0, 2)

    class Recording(ResidentExperts):
        def __init__(self, *a):
            super().__init__(*a)
            self.calls = []

        def experts(self, layer, ids, hidden, rankings=None, counts=None):
            self.calls.append((layer, ids, hidden.clone()))
            return super().experts(layer, ids, hidden)

    rec = Recording(store, "cpu")
    prompt_logits(model, rec)
    with torch.inference_mode():
        hf_router = hf_model(path)(torch.tensor([PROMPT]), output_router_logits=True).router_logits
    assert [c[0] for c in rec.calls] == [0, 1]
    for (m, ids, hidden), ref in zip(rec.calls, hf_router):
        logits = model.router_logits(m, hidden)  # [N, E]
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
        top, _ = model.route(m, logits)  # [N, k]
        assert ids == list(dict.fromkeys(top.flatten().tolist()))  # first appearance, token-major


def test_router_override_forces_routing(tiny_checkpoint):
    path = tiny_checkpoint("mixtral")
    model, store, provider = ours(path)
    base = prompt_logits(model, provider)
    # the model's own routing: nothing changes
    torch.testing.assert_close(prompt_logits(model, provider, route=model.route), base, atol=0, rtol=0)

    seen = []

    class Spy(ResidentExperts):
        def experts(self, layer, ids, hidden, rankings=None, counts=None):
            seen.append(ids)
            return super().experts(layer, ids, hidden)

    def only_expert_3(m, logits):
        n = logits.shape[0]
        return torch.full((n, 1), 3), torch.ones(n, 1)

    forced = prompt_logits(model, Spy(store, "cpu"), route=only_expert_3)
    assert seen == [[3], [3]]
    assert not torch.allclose(forced, base)


def test_sharded_checkpoint_loads(tiny_checkpoint):
    path = tiny_checkpoint("mixtral", max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    model, _, provider = ours(path)
    with torch.inference_mode():
        ref = hf_model(path)(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(prompt_logits(model, provider), ref, atol=1e-4, rtol=1e-4)


def test_bf16_checkpoint_matches_transformers_in_bf16(tiny_checkpoint):
    path = tiny_checkpoint("qwen3_moe", dtype="bfloat16", num_experts_per_tok=3)
    model, store, provider = ours(path)
    assert model.dtype == torch.bfloat16 and store.layout.dtype == torch.bfloat16
    hf = hf_model(path, "bfloat16")
    with torch.inference_mode():
        ref = hf(torch.tensor([PROMPT])).logits[0]
        hf_tokens = hf.generate(torch.tensor([PROMPT]), max_new_tokens=20, do_sample=False)[0, len(PROMPT):]
    got = prompt_logits(model, provider)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert generate(model, provider, PROMPT, 20, eos_ids=(2,)).token_ids == hf_tokens.tolist()
    # the same checkpoint computed in float32 stays close to the bf16 reference
    model32, _, provider32 = ours(path, torch.float32)
    torch.testing.assert_close(prompt_logits(model32, provider32), ref.float(), atol=5e-2, rtol=5e-2)


def test_fused_expert_layout_of_transformers5_loads(tiny_checkpoint, tmp_path):
    """Rewrite a save_pretrained checkpoint with fused experts.gate_up_proj/down_proj and mlp.gate."""
    src = tiny_checkpoint("mixtral")
    sd = load_file(str(src / "model.safetensors"))
    out = {}
    for layer in range(2):
        p = f"model.layers.{layer}.block_sparse_moe"
        w1 = torch.stack([sd.pop(f"{p}.experts.{e}.w1.weight") for e in range(8)])  # [E, I, H]
        w3 = torch.stack([sd.pop(f"{p}.experts.{e}.w3.weight") for e in range(8)])
        w2 = torch.stack([sd.pop(f"{p}.experts.{e}.w2.weight") for e in range(8)])  # [E, H, I]
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat([w1, w3], dim=1)
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = w2
        out[f"model.layers.{layer}.mlp.gate.weight"] = sd.pop(f"{p}.gate.weight")
    save_file({**sd, **out}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    model, store, provider = ours(tmp_path)
    _, store_ref, provider_ref = ours(src)
    for m in range(2):
        for e in range(8):
            assert torch.equal(store.flat(m, e), store_ref.flat(m, e))
    torch.testing.assert_close(prompt_logits(model, provider), prompt_logits(*ours(src)[::2]), atol=0, rtol=0)


def test_make_tiny_classic_and_fused_layouts_agree(tmp_path):
    """make-tiny writes the HF per-expert layout itself (no transformers); fused holds the same numbers."""
    a = write_tiny_checkpoint("qwen2_moe", tmp_path / "classic", seed=3, num_experts_per_tok=3)
    b = write_tiny_checkpoint("qwen2_moe", tmp_path / "fused", seed=3, fused_experts=True, num_experts_per_tok=3)
    from safetensors import safe_open

    with safe_open(str(a / "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.experts.7.gate_proj.weight" in f.keys()
    ma, sa, pa = ours(a)
    mb, sb, pb = ours(b)
    torch.testing.assert_close(prompt_logits(ma, pa), prompt_logits(mb, pb), atol=0, rtol=0)
    res = generate(ma, pa, PROMPT, 8)
    assert res.token_ids == generate(mb, pb, PROMPT, 8).token_ids and len(res.token_ids) == 8


def test_host_store_layout_and_views():
    layout = ExpertLayout(hidden_size=4, intermediate_size=3, dtype=torch.float16)
    assert layout.numel == 36 and layout.nbytes == 72
    store = HostExpertStore(layout, n_experts=5, top_k=2, model_layers=[1, 3], pin=False)
    assert store.n_moe_layers == 2 and store.moe_index(3) == 1 and store.nbytes == 2 * 5 * 72
    flat = store.flat(1, 4)
    assert flat.is_contiguous() and flat.shape == (36,)
    flat.copy_(torch.arange(36, dtype=torch.float16))
    w1, w3, w2 = store.weights(1, 4)
    assert w1.shape == (3, 4) and w3.shape == (3, 4) and w2.shape == (4, 3)
    assert w1.data_ptr() == flat.data_ptr() and w3[0, 0] == 12 and w2[0, 0] == 24 and w2[3, 2] == 35


def test_host_store_counts_moe_layers_only():
    store = HostExpertStore(ExpertLayout(4, 3, torch.float16), n_experts=2, top_k=1, model_layers=[1, 3], pin=False)
    assert store.n_moe_layers == 2 and store.n_moe_layers == 2  # n_layers: the alias the offload provider reads


def test_sampling_is_seeded_and_stops_at_eos(tmp_path):
    path = write_tiny_checkpoint("olmoe", tmp_path / "m", seed=1)
    model, _, provider = ours(path)
    a = generate(model, provider, PROMPT, 12, temperature=1.0, top_p=0.9, seed=7)
    b = generate(model, provider, PROMPT, 12, temperature=1.0, top_p=0.9, seed=7)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12
    greedy = generate(model, provider, PROMPT, 12).token_ids
    eos = greedy[3]
    stopped = generate(model, provider, PROMPT, 12, eos_ids=[eos])
    first = greedy.index(eos)
    assert stopped.token_ids == greedy[: first + 1] and stopped.stopped_at_eos
    steps = []
    generate(model, provider, PROMPT, 5, on_step=lambda s, t: steps.append((s, t)))
    assert steps == list(enumerate(greedy[:5]))
