"""Expert formats as sizes only: which pieces one expert's host buffer holds, where, and how many bytes.

Contract: ``expert_pieces(codec, hidden, intermediate, bias_dtype=None)`` lists
the pieces (name, element dtype name, shape, byte offset) of one expert packed
in ``codec``; ``expert_nbytes(...)`` is the size of that buffer. ``CODECS``
names the codecs; ``EXPERT_DTYPES`` the ``--expert-dtype`` choices.

- ``float32`` / ``bfloat16`` / ``float16``: the plain layout, one element
  buffer w1 (gate, [I, H]) | w3 (up, [I, H]) | w2 (down, [H, I]), then the
  biases b1 [I] | b3 [I] | b2 [H] when the family has them (GPT-OSS).
- ``int8`` / ``int4``: symmetric group-wise quantization along each matrix's
  input dimension in groups of ``GROUP`` (32) weights with one float16 scale per
  group (llama.cpp's Q8_0 / Q4_0 recipe: 8.5 and 4.5 bits per weight). A row
  whose length is not a multiple of 32 ends in a shorter group, stored padded
  with zeros. int4 packs two weights per byte, the even index in the low nibble.
- ``mxfp4``: OCP MXFP4 as GPT-OSS checkpoints store it: FP4 (e2m1) values,
  two per byte (low nibble first), in blocks of 32 along the input dimension,
  each with one E8M0 (power of two, bias 127) scale byte: 4.25 bits per weight.
  The input dimension must be a multiple of 32.

Quantized experts are byte buffers: each piece starts at a multiple of
``ALIGN`` bytes (so typed views of it are aligned) and the buffer size is a
multiple of ``ALIGN``. This module imports no torch (the simulator sizes
experts with it) and knows no tensors.
"""

from __future__ import annotations

from math import ceil

from moe_runtime.core.errors import MoeError

PLAIN = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANTIZED = ("int8", "int4", "mxfp4")
CODECS = (*PLAIN, *QUANTIZED)
EXPERT_DTYPES = ("auto", *PLAIN, "int8", "int4")  # mxfp4 only as a checkpoint stores it (auto)
GROUP = 32  # weights per scale, every quantized codec
ALIGN = 16
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "uint8": 1}


def _matrix(codec: str, out: int, inp: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """Pieces of one [out, inp] matrix: (suffix, dtype name, shape)."""
    groups = ceil(inp / GROUP)
    if codec == "int8":
        return [("q", "int8", (out, groups * GROUP)), ("scale", "float16", (out, groups))]
    if codec == "int4":
        return [("q", "uint8", (out, groups * GROUP // 2)), ("scale", "float16", (out, groups))]
    if codec == "mxfp4":
        if inp % GROUP:
            raise MoeError(f"mxfp4 experts need an input dimension that is a multiple of {GROUP}, got {inp}")
        return [("blocks", "uint8", (out, inp // GROUP, GROUP // 2)), ("scales", "uint8", (out, inp // GROUP))]
    return [("w", codec, (out, inp))]


def expert_pieces(codec: str, hidden: int, intermediate: int,
                  bias_dtype: str | None = None) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(name, dtype name, shape, offset) of every piece of one expert; offsets in elements of a plain
    codec's dtype, in bytes otherwise. ``bias_dtype`` (a plain dtype name) adds b1, b3, b2."""
    if codec not in CODECS:
        raise MoeError(f"unknown expert format {codec!r} (choose {', '.join(CODECS)})")
    h, i = hidden, intermediate
    parts = []
    for name, (out, inp) in (("w1", (i, h)), ("w3", (i, h)), ("w2", (h, i))):
        parts += [(f"{name}.{suffix}" if codec in QUANTIZED else name, dt, shape)
                  for suffix, dt, shape in _matrix(codec, out, inp)]
    if bias_dtype is not None:
        parts += [("b1", bias_dtype, (i,)), ("b3", bias_dtype, (i,)), ("b2", bias_dtype, (h,))]
    out, pos = [], 0
    for name, dt, shape in parts:
        n = 1
        for s in shape:
            n *= s
        if codec in QUANTIZED:  # byte offsets, aligned
            pos = ceil(pos / ALIGN) * ALIGN
            out.append((name, dt, shape, pos))
            pos += n * ELEMENT_BYTES[dt]
        else:  # one element buffer of the codec's dtype
            out.append((name, dt, shape, pos))
            pos += n
    return out


def expert_numel(codec: str, hidden: int, intermediate: int, bias_dtype: str | None = None) -> int:
    """Elements of one expert's flat buffer (bytes for quantized codecs)."""
    name, dt, shape, pos = expert_pieces(codec, hidden, intermediate, bias_dtype)[-1]
    n = 1
    for s in shape:
        n *= s
    if codec in QUANTIZED:
        return ceil((pos + n * ELEMENT_BYTES[dt]) / ALIGN) * ALIGN
    return pos + n


def expert_nbytes(codec: str, hidden: int, intermediate: int, bias_dtype: str | None = None) -> int:
    """Bytes of one expert's flat buffer: what one copy moves and one slot holds."""
    n = expert_numel(codec, hidden, intermediate, bias_dtype)
    return n if codec in QUANTIZED else n * PLAIN[codec]
