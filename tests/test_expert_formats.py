"""Expert formats: sizes (one table for the runtime and the simulator), group-wise int8/int4 and MXFP4
round trips, stacked views, refusals; the simulator's --expert-dtype and the model YAMLs' expert_dtype."""

from __future__ import annotations

import pytest
import torch

from moe_runtime.core.errors import MoeError
from moe_runtime.core.format_sizes import CODECS, expert_nbytes
from moe_runtime.model.formats import (DenseExpert, ExpertFormat, dequantize_mxfp4, quantize_groups,
                                       quantize_mxfp4, unpack_int4)
from moe_runtime.core.shapes import ModelSpec, load_model_spec


def fmt(codec, h=64, i=40, biases=False, compute=torch.float32, act="silu"):
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(codec, torch.uint8)
    return ExpertFormat(h, i, dtype, codec=codec, compute_dtype=compute, biases=biases, activation=act)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("biases", [False, True])
def test_runtime_and_simulator_sizes_agree(codec, biases):
    i = 64 if codec == "mxfp4" else 40  # 40: the last int group of a row is short (40 = 32 + 8)
    f = fmt(codec, 96, i, biases)
    bias = (codec if codec in ("float32", "bfloat16", "float16") else "float32") if biases else None
    assert f.nbytes == expert_nbytes(codec, 96, i, bias)
    flat = torch.zeros(f.numel, dtype=f.dtype)
    f.views(flat)  # every piece fits, aligned for its dtype


def test_int4_is_under_three_tenths_of_bf16_at_real_shapes():
    for name in ("qwen3-30b-a3b", "deepseek-v2-lite", "olmoe-1b-7b", "gpt-oss-20b"):
        spec = load_model_spec(name)
        bf16 = spec.with_expert_dtype("bfloat16").expert_bytes
        assert spec.with_expert_dtype("int4").expert_bytes <= 0.3 * bf16
        assert spec.with_expert_dtype("int8").expert_bytes <= 0.54 * bf16
    gpt = load_model_spec("gpt-oss-120b")
    assert gpt.expert_dtype == "mxfp4" and gpt.expert_biases
    weights = 3 * 2880 * 2880
    assert gpt.expert_bytes == pytest.approx(weights * 4.25 / 8 + 2 * (2 * 2880 + 2880), abs=6 * 16)


@pytest.mark.parametrize("bits", [8, 4])
def test_groupwise_quantization_round_trips_within_a_step(bits):
    """int8: half a step; int4: half a step but for weights past +-7 steps opposite the group's largest,
    which is exact at -8 steps: those clamp to 7, within one step."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 70, generator=g) * 0.05  # 70: groups of 32, 32, 6
    q, scale = quantize_groups(w, bits)
    assert scale.dtype == torch.float16 and scale.shape == (24, 3)
    vals = unpack_int4(q) if bits == 4 else q
    assert vals.shape == (24, 96) and int(vals.min()) >= (-8 if bits == 4 else -127)
    assert not vals[:, 70:].any()  # the short group's padding stays zero
    deq = (vals.float().view(24, 3, 32) * scale.float()[..., None]).view(24, 96)[:, :70]
    step = scale.float().abs().repeat_interleave(32, dim=1)[:, :70]
    assert ((deq - w).abs() <= (0.5 if bits == 8 else 1.0) * step + 1e-7).all()
    assert ((deq - w).abs() <= 0.5 * step + 1e-7).float().mean() > 0.97
    if bits == 4:  # the largest weight of each group is exact (it maps to -8)
        big = w.view(24, -1)[:, :64].reshape(24, 2, 32).abs().argmax(-1)
        exact = deq[:, :64].reshape(24, 2, 32).gather(-1, big[..., None])
        torch.testing.assert_close(exact, w[:, :64].reshape(24, 2, 32).gather(-1, big[..., None]), atol=0, rtol=1e-3)


def test_mxfp4_round_trip_and_nibble_order():
    w = torch.tensor([[0.5, -1.0, 6.0, 0.0] * 8])  # one block of 32
    q = quantize_mxfp4(w)
    assert q.blocks.shape == (1, 1, 16) and q.scales.tolist() == [[127]]  # 2^0
    assert q.blocks[0, 0, 0] == 0x1 | (0xA << 4)  # 0.5 low nibble, -1.0 high nibble
    torch.testing.assert_close(dequantize_mxfp4(q.blocks, q.scales, torch.float32), w, atol=0, rtol=0)


@pytest.mark.parametrize("codec", ["int8", "int4", "bfloat16"])
def test_stacked_views_compute_like_single_experts(codec):
    f = fmt(codec, biases=True, act="clamped_swiglu")
    g = torch.Generator().manual_seed(1)
    pool = torch.zeros(3, f.numel, dtype=f.dtype)
    for s in range(3):
        f.pack(pool[s], DenseExpert(*(torch.randn(*shape, generator=g) * 0.1 for shape in
                                      ((40, 64), (40, 64), (64, 40), (40,), (40,), (64,)))))
    x = torch.randn(3, 5, 64, generator=g)
    stacked = f.forward(x, f.views(pool))  # [3, 5, 64]: the gathered/batched form issue 13 will use
    for s in range(3):
        torch.testing.assert_close(stacked[s], f.forward(x[s], f.views(pool[s])), atol=1e-5, rtol=1e-5)


def test_bad_weights_and_formats_are_refused():
    f = fmt("int4")
    flat = torch.zeros(f.numel, dtype=torch.uint8)
    good = [torch.zeros(40, 64), torch.zeros(40, 64), torch.zeros(64, 40)]
    for bad in (float("nan"), float("inf")):
        w = good[0].clone()
        w[3, 3] = bad
        with pytest.raises(MoeError, match="NaN or inf"):
            f.pack(flat, DenseExpert(w, *good[1:]))
    with pytest.raises(MoeError, match="overflows float16"):
        fmt("int8").pack(torch.zeros(fmt("int8").numel, dtype=torch.uint8),
                         DenseExpert(torch.full((40, 64), 1e9), *good[1:]))
    with pytest.raises(MoeError, match="multiple of 32"):
        fmt("mxfp4", 64, 40)
    with pytest.raises(MoeError, match="uint8"):
        ExpertFormat(64, 40, torch.float32, codec="int8")
    with pytest.raises(MoeError, match="expert_dtype"):
        ModelSpec(name="x", n_layers=1, moe_layers=(0,), n_experts=2, top_k=1, hidden_size=8,
                  moe_intermediate_size=8, n_heads=1, n_kv_heads=1, head_dim=8, vocab_size=8, dtype="bfloat16",
                  expert_dtype="int3")


def test_simulator_expert_dtype_sets_the_bytes():
    from simulator.cost_model import CostModel
    from simulator.device import load_device
    from simulator.replay import Replay, ReplayOptions, load_inputs

    trace, spec = load_inputs("traces/deepseek-v2-lite-law.npz", tokens=24)
    cost = CostModel(spec, load_device("t4"))
    reps = {dt: Replay(trace, cost, ReplayOptions(budget="25%", expert_dtype=dt)).run()
            for dt in (None, "bfloat16", "int8", "int4")}
    assert reps[None]["expert_bytes"] == reps["bfloat16"]["expert_bytes"] == spec.expert_bytes
    assert reps["int4"]["expert_bytes"] == spec.with_expert_dtype("int4").expert_bytes < 0.3 * spec.expert_bytes
    assert reps["int4"]["stall_s"] < reps["int8"]["stall_s"] < reps[None]["stall_s"]
    assert reps["int4"]["misses"] == reps[None]["misses"]  # same slots (a fraction of experts), fewer bytes
    with pytest.raises(MoeError, match="expert_dtype must be one of"):
        ReplayOptions(expert_dtype="int3")


def test_sweep_takes_an_expert_dtype_key():
    from simulator.sweep import experiment_from_dict

    base = dict(name="q", trace="traces/deepseek-v2-lite-law.npz", budgets=["25%"], evictions=["lru"],
                predictors=["none"], devices=["t4"])
    plain, quant = experiment_from_dict(base), experiment_from_dict({**base, "expert_dtype": "int4"})
    assert plain.points()[0][3].expert_dtype is None and quant.points()[0][3].expert_dtype == "int4"
    assert plain.fingerprint() != quant.fingerprint()


def test_hf_config_of_an_mxfp4_checkpoint_gives_an_mxfp4_spec():
    from moe_runtime.model.tiny import tiny_config_dict

    d = tiny_config_dict("gpt_oss", torch_dtype="bfloat16", quantization_config={"quant_method": "mxfp4"})
    spec = ModelSpec.from_hf_config(d, name="tiny-gpt-oss")
    assert spec.expert_dtype == "mxfp4" and spec.expert_biases
    assert spec.expert_bytes == fmt("mxfp4", 64, 64, biases=True, compute=torch.bfloat16).nbytes
