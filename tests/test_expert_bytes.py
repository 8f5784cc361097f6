"""Experts are read in place: the bytes one MoE layer's decode step writes, counted op by op on CPU.

A dispatch mode sees every aten op of the layer (router, the provider's fetch, the routed experts, the
shared experts) and adds up the bytes each op writes (its non-view outputs; an in-place op's whole
tensor). For float formats that total must not grow with the expert's size beyond activations: run at
intermediate 64 and 512, the difference stays within the [n, I] activations of the routed experts, far
below one expert's weights. Quantized formats dequantize one matrix at a time, never a whole expert.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from moe_runtime.core.model_config import ModelConfig
from moe_runtime.model.experts import HostExpertStore, ResidentExperts
from moe_runtime.model.formats import DenseExpert, format_for
from moe_runtime.model.tiny import tiny_config_dict
from moe_runtime.model.transformer import Transformer
from moe_runtime.offload.provider import OffloadedExperts

H = 64


class Writes(TorchDispatchMode):
    """Bytes written per op: outputs that are not views of an input (in-place outputs count whole)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for ret, t in zip(func._schema.returns, tree_flatten(out)[0] if isinstance(out, (tuple, list)) else [out]):
            if not isinstance(t, torch.Tensor):
                continue
            written = ret.alias_info is not None and ret.alias_info.is_write  # in place: it wrote into it
            if written or t.untyped_storage().data_ptr() not in inputs:  # else a view (or ``to`` a no-op)
                self.writes.append((str(func), t.numel() * t.element_size()))
        return out


def layer_step(intermediate: int, codec: str, offloaded: bool = False) -> tuple[list[tuple[str, int]], int]:
    """(writes of one MoE layer's decode step of one token, one expert's dequantized bytes)."""
    cfg = ModelConfig.from_hf_dict(tiny_config_dict("qwen3_moe", moe_intermediate_size=intermediate,
                                                    num_hidden_layers=1, hidden_size=H))
    torch.manual_seed(0)
    dtype = torch.bfloat16 if codec == "bfloat16" else torch.float32  # float experts: the compute dtype
    model = Transformer(cfg).to(dtype)
    fmt = model.expert_format = format_for(cfg, codec, dtype)
    store = HostExpertStore(fmt, cfg.n_experts, cfg.top_k, cfg.moe_layers, pin=False)
    gen = torch.Generator().manual_seed(1)
    for e in range(cfg.n_experts):
        i = intermediate
        fmt.pack(store.flat(0, e), DenseExpert(*(0.05 * torch.randn(*s, generator=gen) for s in ((i, H), (i, H), (H, i)))))
    if offloaded:  # every expert in a slot already (warm at 100%): the step copies nothing into slots
        provider = OffloadedExperts(store, "cpu", cfg.n_experts)
        provider.begin_step(0, 1)
        provider.experts(0, list(range(cfg.n_experts)), torch.zeros(1, H))
        provider.end_layer(0)
        provider.flush()
    else:
        provider = ResidentExperts(store, "cpu")
    model.setup_cache(4)
    with torch.inference_mode():
        pos = torch.tensor([2])
        inp = model.step_inputs(pos, 0)
        block = model.layers[0]
        h = model.embed_tokens(torch.tensor([7]))  # [1, H]
        h = h + block.self_attn(block.input_layernorm(h), inp.pos, inp.cos, inp.sin, inp.mask, inp.rows)  # [1, H]
        x = block.post_attention_layernorm(h)
        provider.begin_step(2, 1)
        with Writes() as w:
            block.mlp(x, h, provider, fmt)
    if offloaded:
        assert provider.finish()["hits"] == cfg.top_k  # the step read its experts from their slots
    return w.writes, 3 * H * intermediate * dtype.itemsize  # one expert's matrices in the compute dtype


@pytest.mark.parametrize("offloaded", [False, True], ids=["resident", "offloaded"])
@pytest.mark.parametrize("codec", ["float32", "bfloat16"])
def test_float_experts_write_no_weights(codec, offloaded):
    """Experts stored in the compute dtype (float32 here; bfloat16 in a bfloat16 model) are read in place."""
    small, _ = layer_step(64, codec, offloaded)
    large, expert_bytes = layer_step(512, codec, offloaded)
    k = 2  # qwen3_moe tiny's top-k
    elt = torch.empty((), dtype=getattr(torch, codec)).element_size()
    grow = sum(b for _, b in large) - sum(b for _, b in small)
    # each routed expert writes a few [1, I] activations (gate, up, silu, product): at most 6 per expert
    assert 0 <= grow <= k * 6 * (512 - 64) * max(elt, 4)
    assert grow < expert_bytes // 10  # far below one expert's weights (a gathered copy would be >= 2 experts)
    assert max(b for _, b in large) < 512 * 4 * 4  # no single write beyond a few activation rows


@pytest.mark.parametrize("codec", ["int8", "int4", "mxfp4"])
def test_quantized_experts_dequantize_a_matrix_at_a_time(codec):
    writes, expert_bytes = layer_step(512, codec)
    largest = max(b for _, b in writes)
    assert largest < expert_bytes  # never a whole dequantized expert
    assert largest <= expert_bytes // 3 + 4096  # one [I, H] matrix (plus rounding of a small buffer) at most
