"""One forward, two runners, one provider interface (issue 22, item 2).

The MoE block talks to its provider only through ``ExpertProvider``'s calls, which every provider
implements (no probing with hasattr/getattr anywhere); CUDA graphs (graphs.py) replay the segments of
``Transformer.forward`` rather than re-writing its blocks; one decode loop serves a prompt and a batch.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch

from moe_runtime.model.checkpoint import load_model
from moe_runtime.model.experts import ExpertProvider, ResidentExperts
from moe_runtime.model.generate import generate, generate_batch
from moe_runtime.model.tiny import write_tiny_checkpoint
from moe_runtime.offload.provider import OffloadedExperts
from moe_runtime.predictors.calibrate import HiddenCapture

ROOT = Path(__file__).resolve().parent.parent
CALLS = ("begin_step", "prepare", "capacity", "experts", "end_layer")


def test_every_provider_implements_the_one_interface():
    for cls in (ResidentExperts, OffloadedExperts, HiddenCapture):
        assert issubclass(cls, ExpertProvider)
        for name in ("capacity", "experts"):  # the two calls without a default
            assert getattr(cls, name) is not getattr(ExpertProvider, name), (cls, name)
    assert all(callable(getattr(ExpertProvider, c)) for c in CALLS)


def test_nothing_probes_a_provider():
    probe = re.compile(r"\b(hasattr|getattr)\(\s*(self\.)?(provider|prov|inner|capture)\b\s*,\s*[\"']")
    found = [f"{p.relative_to(ROOT)}:{i}" for base in ("moe_runtime", "benchmarks")
             for p in (ROOT / base).rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
             if probe.search(line)]
    assert found == []


def test_graphs_replay_the_forwards_segments_not_a_copy_of_it():
    src = (ROOT / "moe_runtime/model/graphs.py").read_text()
    assert "model.segment(" in src and "model.head(" in src
    for rewritten in ("self_attn(", "input_layernorm(", "post_attention_layernorm(", ".route(", "lm_head"):
        assert rewritten not in src, rewritten


def test_one_loop_for_a_prompt_and_a_batch():
    with tempfile.TemporaryDirectory() as tmp:
        model, store = load_model(write_tiny_checkpoint("qwen2_moe", tmp, seed=3), "cpu")
    provider = ResidentExperts(store, "cpu")
    prompt = [5, 17, 42, 8]
    one = generate(model, provider, prompt, 6)
    batch = generate_batch(model, provider, [prompt], 6)
    assert one.token_ids == batch.sequences[0].token_ids and len(one.token_ids) == 6
    steps: list[tuple] = []
    generate(model, provider, prompt, 3, on_step=lambda s, t: steps.append((s, t)))
    assert steps == list(enumerate(one.token_ids[:3]))
    with torch.inference_mode():  # the forward is its segments: the same logits step by step
        model.setup_cache(8)
        tokens, pos = torch.tensor(prompt), torch.arange(len(prompt))
        ref = model(tokens, pos, provider)
        model.setup_cache(8)
        inp = model.step_inputs(pos, 0)
        h, r = model.segment(0, inp, provider, h=model.embed_tokens(tokens))
        for s in range(1, len(model.moe_layers) + 1):
            out = model.moe_block(s - 1).experts(r, provider, model.expert_format)
            h, r = model.segment(s, inp, provider, prev=r, moe_out=out)
        assert r is None and torch.equal(model.head(h), ref)
