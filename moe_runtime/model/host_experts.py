"""Experts computed by the host CPU from their host copy (hybrid execution), in the format they are stored in.

Contract: ``host_forward(fmt, x, w)`` computes one expert on tokens x [n, H] (a host tensor) from ``w``, the
``fmt.views`` of its flat host buffer, and returns [n, H] in ``fmt.compute_dtype``:

- float codecs (float32, bfloat16, float16): ``F.linear`` on the stored matrices, read in place;
- int8, int4 and MXFP4: dequantized one block of ``BLOCK_ROWS`` output rows at a time, each block computed
  with ``F.linear`` as soon as it is made, so at most one block is ever dequantized, never a whole expert;
- ``int4_kernel`` is torch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``) on a matrix repacked into
  its layout; ``benchmarks/host_experts.py`` measures it beside the block path. Repacking costs a pass over
  the weights, so it pays only for a host copy kept in the kernel's layout; the executor computes int4
  experts by blocks.

Results match ``fmt.forward`` within float rounding (a block's matmul may sum in another order); on a CPU
run the executor computes host experts with ``fmt.forward`` itself, so tokens stay exact. ``host_threads``
sets the threads torch computes with on the host. This module knows nothing of caches or devices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_runtime.core.format_sizes import GROUP, PLAIN
from moe_runtime.model.formats import ExpertFormat, unpack_int4

BLOCK_ROWS = 256  # output rows dequantized at once: 256 x 2048 x 4 B = 2 MiB, cache-sized on any CPU


def host_threads(n: int | None) -> None:
    """Compute host experts on ``n`` threads (None: torch's default)."""
    if n is not None:
        torch.set_num_threads(n)


def _blocked_linear(fmt: ExpertFormat, x: Tensor, w: dict, name: str, out: int, inp: int,
                    b: Tensor | None = None) -> Tensor:
    """x [n, inp] @ W.T for the quantized matrix ``name`` [out, inp], one row block dequantized at a time."""
    keys = [k for k in w if k.startswith(name + ".")]
    y = x.new_empty(x.shape[0], out, dtype=fmt.compute_dtype)  # [n, out]
    for r0 in range(0, out, BLOCK_ROWS):
        r1 = min(r0 + BLOCK_ROWS, out)
        block = fmt._matrix({k: w[k][r0:r1] for k in keys}, name, (r1 - r0, inp))  # [rows, inp]
        y[:, r0:r1] = F.linear(x, block, None if b is None else b[r0:r1])
    return y


def host_forward(fmt: ExpertFormat, x: Tensor, w) -> Tensor:
    """One expert on host tokens x [n, H] from its host views ``w`` -> [n, H] (see the module docstring)."""
    x = x.to(fmt.compute_dtype)
    if fmt.codec in PLAIN:
        return fmt.forward(x, w)  # F.linear on the stored matrices: no copy, no conversion
    H, I = fmt.hidden_size, fmt.intermediate_size
    b1, b3, b2 = (w["b1"], w["b3"], w["b2"]) if fmt.biases else (None, None, None)
    if fmt.biases:
        b1, b3, b2 = (t.to(fmt.compute_dtype) for t in (b1, b3, b2))
    gate = _blocked_linear(fmt, x, w, "w1", I, H, b1)  # [n, I]
    up = _blocked_linear(fmt, x, w, "w3", I, H, b3)  # [n, I]
    if fmt.activation == "silu":
        h = F.silu(gate) * up
    else:  # GPT-OSS's clamped SwiGLU, as ExpertFormat.forward computes it
        gate, up = gate.clamp(max=fmt.limit), up.clamp(min=-fmt.limit, max=fmt.limit)
        h = (up + 1) * (gate * torch.sigmoid(gate * fmt.alpha))
    return _blocked_linear(fmt, h, w, "w2", H, I, b2)  # [n, H]


def int4_pack(q: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """An int4 matrix (our packing: q uint8 [out, G*16], scale float16 [out, G]) in the layout of torch's CPU
    int4 kernel: (packed weight, scales-and-zeros [G, out, 2] float32)."""
    u = unpack_int4(q).to(torch.int32) + 8  # [out, G*32] in 0..15; the kernel subtracts 8
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
    s = scale.float().t()  # [G, out]
    return packed, torch.stack((s, torch.zeros_like(s)), dim=-1).contiguous()  # zero point 0: symmetric


def int4_kernel(x: Tensor, packed: Tensor, scales_zeros: Tensor) -> Tensor:
    """x [n, in] float32 @ W.T with W from ``int4_pack`` -> [n, out] float32."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales_zeros)
