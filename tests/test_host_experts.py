"""Host compute of experts in their stored format: equal to the format's own forward within rounding, for
every codec (GPT-OSS's biased, clamped experts too), and the int4 kernel path agrees with the block path."""

import pytest
import torch

from moe_runtime.model.formats import DenseExpert, ExpertFormat, quantize_groups
from moe_runtime.model.host_experts import BLOCK_ROWS, host_forward, int4_kernel, int4_pack

H, I = 96, 2 * BLOCK_ROWS + 32  # three row blocks, the last one partial (a multiple of 32: MXFP4)


def _expert(fmt: ExpertFormat, biases: bool, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mats = [torch.randn(I, H, generator=g) / H**0.5, torch.randn(I, H, generator=g) / H**0.5,
            torch.randn(H, I, generator=g) / I**0.5]
    bias = [torch.randn(n, generator=g) * 0.1 for n in (I, I, H)] if biases else [None] * 3
    flat = torch.empty(fmt.numel, dtype=fmt.dtype)
    fmt.pack(flat, DenseExpert(*mats, *bias))
    return flat


@pytest.mark.parametrize("codec", ["float32", "bfloat16", "int8", "int4", "mxfp4"])
@pytest.mark.parametrize("gpt_oss", [False, True])
def test_host_forward_matches_the_format_forward(codec, gpt_oss):
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(codec, torch.uint8)
    kw = dict(biases=True, activation="clamped_swiglu") if gpt_oss else {}
    fmt = ExpertFormat(H, I, dtype, codec=codec, compute_dtype=torch.float32 if dtype == torch.uint8 else dtype, **kw)
    w = fmt.views(_expert(fmt, gpt_oss))
    x = torch.randn(5, H).to(fmt.compute_dtype)
    ref, got = fmt.forward(x, w), host_forward(fmt, x, w)
    assert got.shape == (5, H) and got.dtype == fmt.compute_dtype
    tol = 2e-2 if fmt.compute_dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(got.float(), ref.float(), atol=tol, rtol=tol), (got - ref).abs().max()
    assert ref.abs().max() > 0.1  # a real output, not zeros


def test_int4_kernel_equals_dequantized_matmul():
    w = torch.randn(64, 128)
    q, scale = quantize_groups(w, 4)
    fmt = ExpertFormat(128, 64, torch.uint8, codec="int4")
    dense = fmt._matrix({"w1.q": q, "w1.scale": scale}, "w1", (64, 128))
    x = torch.randn(3, 128)
    got = int4_kernel(x, *int4_pack(q, scale))
    assert torch.allclose(got, torch.nn.functional.linear(x, dense), atol=1e-4, rtol=1e-4)


def test_int4_experts_through_the_kernel_layout_equal_the_block_path():
    """An int4 expert repacked once for torch's int4 kernel (``Int4Packed``) computes what the block path
    computes, within float rounding; the kernel is used only where the tokens may carry its rounding."""
    import torch

    from moe_runtime.model.formats import DenseExpert, ExpertFormat
    from moe_runtime.model.host_experts import host_weights, int4_packed, uses_int4_kernel
    for compute, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        fmt = ExpertFormat(64, 32, torch.uint8, codec="int4", compute_dtype=compute)
        flat = torch.empty(fmt.numel, dtype=torch.uint8)
        fmt.pack(flat, DenseExpert(torch.randn(32, 64), torch.randn(32, 64), torch.randn(64, 32)))
        w = fmt.views(flat)
        x = torch.randn(5, 64)
        block, kernel = host_forward(fmt, x, w).float(), host_forward(fmt, x, int4_packed(fmt, w)).float()
        assert (block - kernel).abs().max().item() <= tol * block.abs().max().item()
        assert uses_int4_kernel(fmt, "cuda", False) and uses_int4_kernel(fmt, "cpu", True)
        assert not uses_int4_kernel(fmt, "cpu", False)  # a CPU run from the model's own copy stays exact
        assert host_weights(fmt, w, False) is w
    odd = ExpertFormat(40, 24, torch.uint8, codec="int4")
    assert not uses_int4_kernel(odd, "cuda", True)  # the kernel packs output rows in multiples of 16
