"""An expert format owns an expert: its packing into one flat host buffer, its size, its unpacking on the
device and its forward.

Contract: ``ExpertFormat(hidden, intermediate, dtype, codec=..., ...)``, frozen:

- ``dtype`` / ``numel`` / ``nbytes``: the flat buffer of one expert, a 1-D
  tensor of ``numel`` elements of ``dtype``: the weights' dtype for the plain
  codecs (w1 | w3 | w2 [| b1 | b3 | b2]), ``torch.uint8`` for ``int8``, ``int4``
  and ``mxfp4`` (pieces at 16-byte aligned offsets; see format_sizes.py). Host
  stores, slot pools and copy engines hold and move these buffers as opaque
  rows and never look inside.
- ``views(flat)`` slices a buffer into its typed pieces without copying
  (``ExpertWeights`` for a plain codec without biases, as before); leading
  dimensions are kept, so views of a stacked [S, numel] pool are stacked pieces.
- ``pack(flat, expert)`` fills a host buffer from a ``DenseExpert`` (float
  matrices, or an ``Mxfp4Matrix`` as a checkpoint stores it): quantizes,
  converts, or copies MXFP4 as stored. MoeError on a non-finite weight or scale.
- ``dense(weights)`` unpacks / dequantizes on the device to compute-dtype
  matrices (views, no copy, when the plain dtype is the compute dtype);
  ``forward(x, weights)`` is the expert: x [..., n, H] -> [..., n, H], plain
  SwiGLU ``down(silu(gate(x)) * up(x))`` or GPT-OSS's clamped SwiGLU with
  biases. Both take stacked weights ([S, ...] leading dims) as well as one.

This module reads no files and knows no cache; checkpoint.py builds formats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_runtime.core.errors import MoeError
from moe_runtime.core.format_sizes import GROUP, PLAIN, QUANTIZED, expert_numel, expert_pieces


def all_finite(t: Tensor) -> bool:
    """True iff the floating tensor ``t`` holds no NaN or inf.

    One min/max pass (NaN propagates through both): on CPU about 15x faster than
    ``isfinite(t).all()``, which matters where every expert read from disk is checked."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8,
         "uint8": torch.uint8}
NAMES = {v: k for k, v in TORCH.items()}
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


class ExpertWeights(NamedTuple):
    """The three matrices of one SwiGLU expert: down(silu(x @ w1.T) * (x @ w3.T)). Made by
    ``ExpertFormat.views`` only: views of one flat buffer, w3's rows right after w1's."""

    w1: Tensor  # gate proj [I, H]
    w3: Tensor  # up proj [I, H]
    w2: Tensor  # down proj [H, I]


class Mxfp4Matrix(NamedTuple):
    """One [out, in] matrix as an MXFP4 checkpoint stores it."""

    blocks: Tensor  # uint8 [out, in/32, 16], two FP4 values per byte, low nibble first
    scales: Tensor  # uint8 [out, in/32], E8M0 exponents (bias 127)


class DenseExpert(NamedTuple):
    """One expert as a checkpoint gives it: matrices (float tensors or ``Mxfp4Matrix``), optional biases."""

    w1: Tensor | Mxfp4Matrix  # gate [I, H]
    w3: Tensor | Mxfp4Matrix  # up [I, H]
    w2: Tensor | Mxfp4Matrix  # down [H, I]
    b1: Tensor | None = None  # [I]
    b3: Tensor | None = None  # [I]
    b2: Tensor | None = None  # [H]


@dataclass(frozen=True)
class ExpertFormat:
    """One expert's packing, size, unpacking and forward; see the module docstring."""

    hidden_size: int  # H
    intermediate_size: int  # I
    dtype: torch.dtype  # element dtype of the flat buffer (uint8 for the quantized codecs)
    codec: str = ""  # "" = the plain codec of ``dtype``; else float32 | bfloat16 | float16 | int8 | int4 | mxfp4
    compute_dtype: torch.dtype | None = None  # what dense() returns; None = dtype
    biases: bool = False  # b1, b3, b2 (GPT-OSS)
    activation: str = "silu"  # "silu" | "clamped_swiglu" (GPT-OSS)
    alpha: float = 1.702  # clamped_swiglu: glu = gate * sigmoid(alpha * gate)
    limit: float = 7.0  # clamped_swiglu: gate <= limit, -limit <= up <= limit
    _pieces: tuple = field(default=(), init=False, repr=False, compare=False)
    _numel: int = field(default=0, init=False, repr=False, compare=False)  # computed once (read per layer)
    _nbytes: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        codec = self.codec or NAMES.get(self.dtype, "")
        if codec not in (*PLAIN, *QUANTIZED):
            raise MoeError(f"unsupported expert format {codec or self.dtype!r}")
        if codec in QUANTIZED and self.dtype != torch.uint8:
            raise MoeError(f"{codec} experts are byte buffers (dtype uint8), got {self.dtype}")
        if codec in PLAIN and TORCH[codec] != self.dtype:
            raise MoeError(f"expert format {codec} stores {codec}, not {self.dtype}")
        compute = self.compute_dtype or (self.dtype if codec in PLAIN else torch.float32)
        if self.activation not in ("silu", "clamped_swiglu"):
            raise MoeError(f"unknown expert activation {self.activation!r}")
        bias = (codec if codec in PLAIN else NAMES[compute]) if self.biases else None
        object.__setattr__(self, "codec", codec)
        object.__setattr__(self, "compute_dtype", compute)
        object.__setattr__(self, "_pieces", tuple(expert_pieces(codec, self.hidden_size, self.intermediate_size,
                                                                bias)))
        numel = expert_numel(codec, self.hidden_size, self.intermediate_size, bias)
        object.__setattr__(self, "_numel", numel)
        object.__setattr__(self, "_nbytes", numel * torch.empty((), dtype=self.dtype).element_size())

    # ---- size ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The codec's name, as --expert-dtype and the simulator write it."""
        return self.codec

    @property
    def numel(self) -> int:
        return self._numel

    @property
    def nbytes(self) -> int:
        return self._nbytes

    # ---- views ----------------------------------------------------------------------------
    def views(self, flat: Tensor):
        """Typed views of the pieces of a flat [..., numel] buffer (no copy): ``ExpertWeights`` for a plain
        codec without biases, else a dict name -> view (``w1.q``, ``w1.scale``, ``b1``, ...)."""
        if flat.shape[-1:] != (self.numel,) or flat.dtype != self.dtype:
            raise ValueError(f"expected a flat [..., {self.numel}] {self.dtype} tensor, got {tuple(flat.shape)} "
                             f"{flat.dtype}")
        lead = flat.shape[:-1]
        out = {}
        for name, dt, shape, pos in self._pieces:
            n = 1
            for s in shape:
                n *= s
            if self.codec in PLAIN:
                piece = flat[..., pos: pos + n]
            else:  # a byte range reinterpreted as the piece's dtype
                size = torch.empty((), dtype=TORCH[dt]).element_size()
                piece = flat[..., pos: pos + n * size].view(TORCH[dt])
            out[name] = piece.view(*lead, *shape)
        if self.codec in PLAIN and not self.biases:
            return ExpertWeights(out["w1"], out["w3"], out["w2"])
        return out

    # ---- packing (host, at load) --------------------------------------------------------------
    @torch.no_grad()
    def pack(self, flat: Tensor, expert: DenseExpert) -> None:
        """Fill ``flat`` [numel] with ``expert`` in this format (quantizing or converting as needed)."""
        v = self.views(flat)
        v = v._asdict() if isinstance(v, ExpertWeights) else v
        for name in ("w1", "w3", "w2"):
            m = getattr(expert, name)
            if self.codec in PLAIN:
                v[name].copy_(_as_dense(m, name))
            elif self.codec == "mxfp4":
                blocks, scales = m if isinstance(m, Mxfp4Matrix) else quantize_mxfp4(_as_dense(m, name))
                _check_mxfp4(blocks, scales, v[f"{name}.blocks"].shape, name)
                v[f"{name}.blocks"].copy_(blocks)
                v[f"{name}.scales"].copy_(scales)
            else:
                q, scale = quantize_groups(_as_dense(m, name), 4 if self.codec == "int4" else 8, name)
                v[f"{name}.q"].copy_(q)
                v[f"{name}.scale"].copy_(scale)
        if self.biases:
            for name in ("b1", "b3", "b2"):
                b = getattr(expert, name)
                if b is None:
                    raise MoeError(f"expert bias {name} is missing")
                v[name].copy_(b)

    # ---- unpacking and forward (device, at use) ---------------------------------------------
    def dense(self, w) -> tuple[Tensor, ...]:
        """(w1, w3, w2, b1, b3, b2) in the compute dtype (biases None without them) from ``views`` output."""
        if isinstance(w, ExpertWeights):  # a plain codec's views: converted only if stored in another dtype
            return (*w, None, None, None) if self.dtype == self.compute_dtype else (
                *(m.to(self.compute_dtype) for m in w), None, None, None)
        mats = tuple(self._matrix(w, n, shape) for n, shape in
                     (("w1", (self.intermediate_size, self.hidden_size)),
                      ("w3", (self.intermediate_size, self.hidden_size)),
                      ("w2", (self.hidden_size, self.intermediate_size))))
        biases = tuple(w[n].to(self.compute_dtype) for n in ("b1", "b3", "b2")) if self.biases else (None,) * 3
        if mats[0].dtype != self.compute_dtype:
            mats = tuple(m.to(self.compute_dtype) for m in mats)
        return (*mats, *biases)

    def _matrix(self, w: dict, name: str, shape: tuple[int, int]) -> Tensor:
        out, inp = shape
        if self.codec in PLAIN:
            return w[name]
        if self.codec == "mxfp4":
            return dequantize_mxfp4(w[f"{name}.blocks"], w[f"{name}.scales"], self.compute_dtype)
        q, scale = w[f"{name}.q"], w[f"{name}.scale"]  # [..., out, G*32 (/2)], [..., out, G]
        if self.codec == "int4":
            q = unpack_int4(q)  # [..., out, G*32] int8 in -8..7
        groups = q.float().unflatten(-1, (-1, GROUP)) * scale.float()[..., None]  # [..., out, G, 32]
        return groups.flatten(-2)[..., :inp].to(self.compute_dtype)  # [..., out, in]

    def forward(self, x: Tensor, w) -> Tensor:
        """The expert on tokens x [..., n, H] -> [..., n, H] (weights from ``views``, one or stacked)."""
        if isinstance(w, ExpertWeights) and self.activation == "silu" and self.dtype == self.compute_dtype \
                and w.w1.dim() == 2:
            # one plain expert read in place: w1 | w3 are adjacent rows of its buffer, so gate and up are one
            # [2I, H] matmul over a view (as transformers computes its fused gate_up_proj): one launch fewer
            I, H = self.intermediate_size, self.hidden_size
            gate, up = F.linear(x, w.w1.as_strided((2 * I, H), (H, 1))).chunk(2, dim=-1)  # [..., n, I] each
            return F.linear(F.silu(gate) * up, w.w2)  # [..., n, H]
        w1, w3, w2, b1, b3, b2 = self.dense(w)
        lin = F.linear if w1.dim() == 2 else _stacked_linear  # one expert (as transformers computes it), or stacked
        if self.activation == "silu":
            return lin(F.silu(lin(x, w1)) * lin(x, w3), w2)
        # GPT-OSS: gate_up = x W + b, gate clamped above, up clamped both ways, (up + 1) * gate * sigmoid(alpha gate)
        gate = lin(x, w1, b1).clamp(max=self.limit)  # [..., n, I]
        up = lin(x, w3, b3).clamp(min=-self.limit, max=self.limit)  # [..., n, I]
        glu = gate * torch.sigmoid(gate * self.alpha)
        return lin((up + 1) * glu, w2, b2)  # [..., n, H]


def _stacked_linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    # stacked experts [S, out, in]: a batched matmul
    y = torch.matmul(x, w.transpose(-1, -2))
    return y if b is None else y + b.unsqueeze(-2)


def _as_dense(m, name: str) -> Tensor:
    if isinstance(m, Mxfp4Matrix):
        _check_mxfp4(m.blocks, m.scales, None, name)
        return dequantize_mxfp4(m.blocks, m.scales, torch.float32)
    if not all_finite(m):
        raise MoeError(f"expert weight {name} holds NaN or inf")
    return m


# ---- group-wise int8 / int4 --------------------------------------------------------------------

def quantize_groups(w: Tensor, bits: int, name: str = "weight") -> tuple[Tensor, Tensor]:
    """Symmetric group-wise quantization of w [out, in] along ``in`` (groups of 32, the last one zero-padded).

    The scale is the group's largest-magnitude weight over -2^(bits-1) (so that weight is exact), rounded
    to float16 before the weights are divided by it. Returns (q, scale): int8 [out, G*32] in
    -127..127 for 8 bits; for 4 bits q is uint8 [out, G*16], two values -8..7 per byte (low nibble first).
    """
    if not all_finite(w):
        raise MoeError(f"expert weight {name} holds NaN or inf")
    out, inp = w.shape
    groups = -(-inp // GROUP)
    g = F.pad(w.float(), (0, groups * GROUP - inp)).view(out, groups, GROUP)  # [out, G, 32]
    if bits == 8:
        scale = (g.abs().amax(-1) / 127).to(torch.float16)  # [out, G]
        lo, hi = -127, 127
    else:
        idx = g.abs().argmax(-1, keepdim=True)
        scale = (g.gather(-1, idx).squeeze(-1) / -8).to(torch.float16)  # the largest weight maps to -8
        lo, hi = -8, 7
    if not torch.isfinite(scale).all():
        raise MoeError(f"expert weight {name}: a group's scale overflows float16 (weights above "
                       f"{65504 * 8:g} cannot be quantized)")
    s = scale.float()[..., None]
    q = torch.where(s != 0, torch.round(g / torch.where(s != 0, s, 1)), 0).clamp(lo, hi).to(torch.int8)
    q = q.view(out, groups * GROUP)
    if bits == 4:
        u = (q & 0x0F).to(torch.uint8)  # two's complement nibbles
        q = u[:, 0::2] | (u[:, 1::2] << 4)
    return q, scale


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 [..., n/2] -> int8 [..., n] in -8..7 (low nibble first)."""
    lo = (packed & 0x0F).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    q = torch.stack((lo, hi), dim=-1).flatten(-2)  # [..., n]
    return q - ((q & 0x08) << 1)  # sign-extend the nibble


# ---- MXFP4 ------------------------------------------------------------------------------------

_FP4_TABLES: dict = {}


def _fp4_table(device: torch.device) -> Tensor:
    """FP4_VALUES on ``device``, made once per device: building it inside a forward would be a
    blocking host-to-device copy per call, and is illegal while a CUDA graph captures."""
    table = _FP4_TABLES.get(device)
    if table is None:
        table = _FP4_TABLES[device] = torch.tensor(FP4_VALUES, dtype=torch.float32, device=device)
    return table


def dequantize_mxfp4(blocks: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """blocks uint8 [..., out, G, 16], scales uint8 [..., out, G] -> [..., out, G*32] in ``dtype``.

    Each value is FP4_VALUES[nibble] * 2^(scale - 127): exact in float32 and bfloat16, as transformers'
    dequantization (``Mxfp4Config(dequantize=True)``) computes it."""
    lut = _fp4_table(blocks.device)
    # int32 indices: an int64 [out, in] index would outweigh the dequantized matrix itself in bf16
    idx = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2).int()  # [..., out, G, 32]
    vals = lut[idx] * torch.exp2(scales.float() - 127)[..., None]  # [..., out, G, 32]
    return vals.flatten(-2).to(dtype)


def quantize_mxfp4(w: Tensor) -> Mxfp4Matrix:
    """w [out, in] (in a multiple of 32) -> MXFP4, each block's scale 2^(floor(log2 absmax) - 2), values
    rounded to the nearest FP4 value (clamped to +-6). For tests and make-tiny: real checkpoints come
    quantized."""
    out, inp = w.shape
    g = w.float().reshape(out, inp // GROUP, GROUP)  # [out, G, 32]
    amax = g.abs().amax(-1).clamp(min=2.0 ** -126)
    e = (torch.floor(torch.log2(amax)) - 2).clamp(-127, 127)  # [out, G]
    scaled = g / torch.exp2(e)[..., None]
    lut = torch.tensor(FP4_VALUES[:8])
    mag = (scaled.abs()[..., None] - lut).abs().argmin(-1)  # [out, G, 32] index of the nearest magnitude
    nib = (mag | ((scaled < 0).long() << 3)).to(torch.uint8)
    blocks = nib[..., 0::2] | (nib[..., 1::2] << 4)  # [out, G, 16]
    return Mxfp4Matrix(blocks.contiguous(), (e + 127).to(torch.uint8))


def _check_mxfp4(blocks: Tensor, scales: Tensor, shape, name: str) -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise MoeError(f"mxfp4 {name}: blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() != 3 or blocks.shape[-1] != GROUP // 2 or scales.shape != blocks.shape[:-1]:
        raise MoeError(f"mxfp4 {name}: blocks {list(blocks.shape)} and scales {list(scales.shape)} do not "
                       f"form [out, in/32, 16] and [out, in/32]")
    if shape is not None and tuple(blocks.shape) != tuple(shape):
        raise MoeError(f"mxfp4 {name}: blocks {list(blocks.shape)}, expected {list(shape)}")
    if (scales == 255).any():
        raise MoeError(f"mxfp4 {name}: a scale is 0xFF (NaN in E8M0)")


def format_for(cfg, codec: str, compute_dtype: torch.dtype) -> ExpertFormat:
    """The format of ``cfg``'s (a ModelConfig) experts stored as ``codec`` and computed in ``compute_dtype``."""
    if codec not in (*PLAIN, *QUANTIZED):
        raise MoeError(f"unsupported expert dtype {codec!r} (choose {', '.join((*PLAIN, 'int8', 'int4'))})")
    return ExpertFormat(cfg.hidden_size, cfg.moe_intermediate_size, TORCH[codec] if codec in PLAIN else torch.uint8,
                        codec=codec, compute_dtype=compute_dtype, biases=cfg.expert_biases,
                        activation=cfg.expert_activation, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)
