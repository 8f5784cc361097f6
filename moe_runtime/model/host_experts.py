"""Experts computed by the host CPU from their host copy (hybrid execution), in the format they are stored in.

Contract: ``host_forward(fmt, x, w)`` computes one expert on tokens x [n, H] (a host tensor) from ``w``, the
``fmt.views`` of its flat host buffer, and returns [n, H] in ``fmt.compute_dtype``:

- float codecs (float32, bfloat16, float16): ``F.linear`` on the stored matrices, read in place;
- int8, int4 and MXFP4: dequantized one block of ``BLOCK_ROWS`` output rows at a time, each block computed
  with ``F.linear`` as soon as it is made, so at most one block is ever dequantized, never a whole expert;
- int4 through torch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``) instead, when ``w`` is an
  ``Int4Packed`` (``int4_packed(fmt, w)``: the expert's matrices repacked once into the kernel's layout,
  scales in the compute dtype). Repacking costs a pass over the weights, so the provider keeps the packed
  copy of each expert it computes on the host (as much memory as the int4 expert again, per expert used);
  in bfloat16 the kernel streams the weights some 30x faster than the block path here.

Results match ``fmt.forward`` within float rounding (a block's matmul may sum in another order); on a CPU
run the executor computes host experts with ``fmt.forward`` itself (unless ``--host-dtype`` asked for
another copy), so tokens stay exact. ``host_threads``
sets the threads torch computes with on the host. This module knows nothing of caches or devices.
"""

from __future__ import annotations

from typing import NamedTuple

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


class Int4Packed(NamedTuple):
    """An int4 expert in the layout of torch's CPU int4 kernel: (packed weight, scales-and-zeros) per matrix,
    and the biases in the compute dtype (or None)."""

    w1: tuple[Tensor, Tensor]
    w3: tuple[Tensor, Tensor]
    w2: tuple[Tensor, Tensor]
    biases: tuple | None


def uses_int4_kernel(fmt: ExpertFormat, device, separate_copy: bool) -> bool:
    """Whether host experts of ``fmt`` run on torch's int4 kernel: int4, output rows in multiples of 16 (the
    kernel's packing), and the tokens may carry its rounding: a GPU run (the host's sums differ from the
    device's anyway) or a ``--host-dtype`` copy. A CPU run from the model's own copy stays exact instead."""
    fits = fmt.hidden_size % 16 == 0 and fmt.intermediate_size % 16 == 0
    return (fmt.codec == "int4" and fits and (separate_copy or torch.device(device).type != "cpu")
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))


def host_weights(fmt: ExpertFormat, w, int4_kernel_layout: bool):
    """What the host computes one expert from: its views ``w``, or them repacked for the int4 kernel."""
    return int4_packed(fmt, w) if int4_kernel_layout else w


def int4_packed(fmt: ExpertFormat, w) -> Int4Packed:
    """Repack the int4 expert ``w`` (``fmt.views``) for the kernel (a pass over its weights)."""
    mats = [int4_pack(w[f"{n}.q"], w[f"{n}.scale"], fmt.compute_dtype) for n in ("w1", "w3", "w2")]
    biases = tuple(w[n].to(fmt.compute_dtype) for n in ("b1", "b3", "b2")) if fmt.biases else None
    return Int4Packed(*mats, biases)


def _int4_linear(x: Tensor, m: tuple[Tensor, Tensor], b: Tensor | None) -> Tensor:
    packed, sz = m
    pad = sz.shape[0] * GROUP - x.shape[-1]  # in-features padded to whole groups when packed
    y = int4_kernel(F.pad(x, (0, pad)) if pad else x, packed, sz)
    return y if b is None else y + b


def host_forward(fmt: ExpertFormat, x: Tensor, w) -> Tensor:
    """One expert on host tokens x [n, H] from its host views ``w`` -> [n, H] (see the module docstring)."""
    x = x.to(fmt.compute_dtype)
    if fmt.codec in PLAIN:
        return fmt.forward(x, w)  # F.linear on the stored matrices: no copy, no conversion
    if isinstance(w, Int4Packed):
        b1, b3, b2 = w.biases or (None, None, None)
        gate, up = _int4_linear(x, w.w1, b1), _int4_linear(x, w.w3, b3)  # [n, I] each
        return _int4_linear(_activate(fmt, gate, up), w.w2, b2)
    H, I = fmt.hidden_size, fmt.intermediate_size
    b1, b3, b2 = (w["b1"], w["b3"], w["b2"]) if fmt.biases else (None, None, None)
    if fmt.biases:
        b1, b3, b2 = (t.to(fmt.compute_dtype) for t in (b1, b3, b2))
    gate = _blocked_linear(fmt, x, w, "w1", I, H, b1)  # [n, I]
    up = _blocked_linear(fmt, x, w, "w3", I, H, b3)  # [n, I]
    return _blocked_linear(fmt, _activate(fmt, gate, up), w, "w2", H, I, b2)  # [n, H]


def _activate(fmt: ExpertFormat, gate: Tensor, up: Tensor) -> Tensor:
    """The expert's gated activation of (gate, up) [n, I], as ``ExpertFormat.forward`` computes it."""
    if fmt.activation == "silu":
        h = F.silu(gate) * up
    else:  # GPT-OSS's clamped SwiGLU, as ExpertFormat.forward computes it
        gate, up = gate.clamp(max=fmt.limit), up.clamp(min=-fmt.limit, max=fmt.limit)
        h = (up + 1) * (gate * torch.sigmoid(gate * fmt.alpha))
    return h


def int4_pack(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """An int4 matrix (our packing: q uint8 [out, G*16], scale float16 [out, G]) in the layout of torch's CPU
    int4 kernel: (packed weight, scales-and-zeros [G, out, 2] in ``dtype``, the activations' dtype)."""
    u = unpack_int4(q).to(torch.int32) + 8  # [out, G*32] in 0..15; the kernel subtracts 8
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
    s = scale.to(dtype).t()  # [G, out]
    return packed, torch.stack((s, torch.zeros_like(s)), dim=-1).contiguous()  # zero point 0: symmetric


def int4_kernel(x: Tensor, packed: Tensor, scales_zeros: Tensor) -> Tensor:
    """x [n, in] @ W.T with W from ``int4_pack`` (x in the scales' dtype) -> [n, out]."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales_zeros)
