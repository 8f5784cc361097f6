"""Experts on storage: the packed file, and where each expert's bytes lie on disk.

Packed file (``moe-runtime pack``), version 2:

- bytes 0..4095: ``MOEPACK1`` then a little-endian u32 length and that many
  bytes of UTF-8 JSON (the header), zero padded to 4 KiB;
- then one record per (MoE layer, expert), layer-major, each ``stride`` bytes
  (the expert's flat host buffer, ``record_bytes`` long, zero padded to a
  multiple of 4 KiB), so every record starts 4 KiB-aligned for direct I/O;
- then, at ``checksums_at``, one little-endian u32 CRC-32 per record (of its
  ``record_bytes``), in record order.

The header holds ``version``, ``fingerprint`` (of the model's config, so a
file packed from another model is refused), ``weights`` (``weights_digest``:
the checkpoint's non-expert tensors, so a file packed from another checkpoint
of the same config is refused), ``dtype`` (of the flat buffer),
``record_bytes``, ``stride``, ``n_moe_layers``, ``n_experts``, ``data_start``
and ``checksums_at``. The file is written atomically; opening checks the
magic, the header, the version (a version-1 file, bound to the config alone,
is refused with a line that says to pack again), the fingerprint and weights
(``check``), the record size and the file's length, each failure one MoeError.
A record's CRC is checked by the reader at the record's first read
(``storage.DiskReadEngine``), never again: the steady state costs nothing.

Where there is no packed file, ``safetensors_segments`` finds an expert's
tensors in the checkpoint's own files (two or three byte ranges per expert),
which the reader fetches with aligned over-reads.

An expert's location is a tuple of segments ``(file index, offset, nbytes)``
laid end to end into its slot; ``ExpertFiles`` owns the open files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

import numpy as np

from moe_runtime.core.errors import MoeError
from moe_runtime.core.config_files import input_file, short
from moe_runtime.core.outputs import write_atomic

MAGIC = b"MOEPACK1"
ALIGN = 4096
VERSION = 2
EXPERT_TENSOR = re.compile(r"\.experts\.")  # routed experts' tensors in every family (not shared_experts.)
Segment = tuple[int, int, int]  # (file index, offset, nbytes)


class Located(tuple):
    """An expert's segments, with a name for messages (the checkpoint tensors, or the packed record) and,
    for a packed record, the CRC-32 its bytes must have (``crc``; None: nothing to check)."""

    name: str = "an expert"
    crc: int | None = None

    def __new__(cls, segments, name: str, crc: int | None = None):
        obj = super().__new__(cls, segments)
        obj.name, obj.crc = name, crc
        return obj


def align_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def config_fingerprint(config: dict) -> str:
    """A digest of a checkpoint's config.json (the keys that shape the experts), for matching files to models."""
    keys = sorted(k for k in config if not k.startswith("_") and k not in ("transformers_version", "torch_dtype",
                                                                            "dtype"))
    blob = json.dumps({k: config[k] for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def weights_digest(layout: "SafetensorsLayout") -> str:
    """A digest of a checkpoint's non-expert tensors (names, dtypes, shapes and bytes as stored), which bind a
    packed file to the checkpoint it was packed from: a run loads these tensors anyway, so their bytes are
    in the page cache when a run checks them (CRC-32 per tensor, about 4 GB/s; docs/executor.md)."""
    h = hashlib.sha256()
    buf = bytearray(1 << 24)
    for name in sorted(n for n in layout.tensors if not EXPERT_TENSOR.search(n)):
        f, start, end, shape, dtype = layout.tensors[name]
        crc = 0
        with open(layout.files[f], "rb", buffering=0) as fh:
            fh.seek(start)
            left = end - start
            while left > 0:
                got = fh.readinto(memoryview(buf)[:min(left, len(buf))])
                if not got:
                    raise MoeError(f"{layout.files[f]} is truncated inside tensor {name}")
                crc = zlib.crc32(memoryview(buf)[:got], crc)
                left -= got
        h.update(json.dumps([name, dtype, list(shape), crc]).encode())
    return h.hexdigest()[:16]


def write_packed(path, *, fingerprint: str, dtype: str, record_bytes: int, n_moe_layers: int, n_experts: int,
                 layers: Iterable[np.ndarray], weights: str = "") -> None:
    """Write the packed file atomically; ``layers`` yields, per MoE layer, its experts' bytes [E, record_bytes].
    ``weights``: the checkpoint's ``weights_digest`` ("" for experts of no checkpoint: a synthetic model's)."""
    stride = align_up(record_bytes)
    checksums_at = ALIGN + n_moe_layers * n_experts * stride
    header = dict(version=VERSION, fingerprint=fingerprint, weights=weights, dtype=dtype, record_bytes=record_bytes,
                  stride=stride, n_moe_layers=n_moe_layers, n_experts=n_experts, data_start=ALIGN,
                  checksums_at=checksums_at)
    blob = json.dumps(header).encode()
    if len(blob) + 12 > ALIGN:
        raise MoeError("packed header does not fit in 4 KiB")

    def write(f) -> None:
        f.write((MAGIC + struct.pack("<I", len(blob)) + blob).ljust(ALIGN, b"\0"))
        pad = bytes(stride - record_bytes)
        count, crcs = 0, []
        for layer in layers:
            if layer.shape != (n_experts, record_bytes) or layer.dtype != np.uint8:
                raise MoeError(f"internal: layer record block of shape {layer.shape}, expected "
                               f"({n_experts}, {record_bytes}) uint8")
            for e in range(n_experts):
                record = memoryview(np.ascontiguousarray(layer[e]))
                crcs.append(zlib.crc32(record))
                f.write(record)
                f.write(pad)
            count += 1
        if count != n_moe_layers:
            raise MoeError(f"internal: {count} layers written, expected {n_moe_layers}")
        f.write(struct.pack(f"<{len(crcs)}I", *crcs))
    write_atomic(path, write)


@dataclass(frozen=True)
class PackedHeader:
    path: str
    fingerprint: str
    weights: str
    dtype: str
    record_bytes: int
    stride: int
    n_moe_layers: int
    n_experts: int
    data_start: int
    checksums_at: int
    crcs: tuple[int, ...] = field(default=(), repr=False, compare=False)

    def segments(self, layer: int, expert: int) -> tuple[Segment, ...]:
        i = layer * self.n_experts + expert
        return Located(((0, self.data_start + i * self.stride, self.record_bytes),),
                       f"expert {expert} of MoE layer {layer} in {self.path}", self.crcs[i])


def read_header(path) -> PackedHeader:
    """Parse and check a packed file's header and length (not its fingerprint: see ``check``)."""
    path = input_file(str(path), "packed expert file")  # a FIFO would block the open
    try:
        with open(path, "rb") as f:
            head = f.read(ALIGN)
            size = os.fstat(f.fileno()).st_size
            if not head.startswith(MAGIC) or len(head) < 12:
                raise MoeError(f"{path} is not a packed expert file (made by `moe-runtime pack`)")
            (n,) = struct.unpack("<I", head[8:12])
            try:
                h = json.loads(head[12:12 + n].decode())
                version = h["version"]
                if version == 1:
                    raise MoeError(f"{path} was packed by an older version (format 1: bound to config.json only, no "
                                   "record checksums); run `moe-runtime pack` again")
                if version != VERSION:
                    raise MoeError(f"{path}: packed format version {short(version)}, this build reads {VERSION}")
                hdr = PackedHeader(path=path, **{k: h[k] for k in (
                    "fingerprint", "weights", "dtype", "record_bytes", "stride", "n_moe_layers", "n_experts",
                    "data_start", "checksums_at")})
                ints = (hdr.record_bytes, hdr.stride, hdr.n_moe_layers, hdr.n_experts, hdr.data_start,
                        hdr.checksums_at)
                if not all(type(v) is int and v >= 0 for v in ints) or hdr.stride < hdr.record_bytes:
                    raise TypeError("sizes")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                raise MoeError(f"{path}: packed header is damaged") from None
            n_records = hdr.n_moe_layers * hdr.n_experts
            need = hdr.data_start + n_records * hdr.stride
            if hdr.checksums_at != need:
                raise MoeError(f"{path}: packed header is damaged (checksums at {hdr.checksums_at:,}, records end "
                               f"at {need:,})")
            need += 4 * n_records
            if size < need:
                raise MoeError(f"{path} is truncated: {size:,} bytes, its header needs {need:,}")
            f.seek(hdr.checksums_at)
            crcs = struct.unpack(f"<{n_records}I", f.read(4 * n_records))
    except OSError as e:
        raise MoeError(f"cannot read packed experts {path}: {e.strerror or e}") from None
    return replace(hdr, crcs=crcs)


def check(hdr: PackedHeader, *, fingerprint: str, record_bytes: int, n_moe_layers: int, n_experts: int,
          dtype: str, weights: str | None = None) -> None:
    """Refuse a packed file made from another model, from another checkpoint of the same config (``weights``,
    the checkpoint's ``weights_digest``; None: not checked), or in another expert format (one line)."""
    if hdr.fingerprint != fingerprint:
        raise MoeError(f"{hdr.path} was packed from another model (fingerprint {hdr.fingerprint}, this model's "
                       f"is {fingerprint}): run `moe-runtime pack` again")
    if weights is not None and hdr.weights != weights:
        raise MoeError(f"{hdr.path} was packed from another checkpoint with the same config.json (weights digest "
                       f"{hdr.weights or 'none'}, this checkpoint's is {weights}): run `moe-runtime pack` again")
    got = (hdr.n_moe_layers, hdr.n_experts, hdr.record_bytes, hdr.dtype)
    want = (n_moe_layers, n_experts, record_bytes, dtype)
    if got != want:
        raise MoeError(f"{hdr.path} holds {got[0]} MoE layers x {got[1]} experts of {got[2]:,} bytes ({got[3]}); "
                       f"this run needs {want[0]} x {want[1]} of {want[2]:,} bytes ({want[3]})")


class SafetensorsLayout:
    """Byte ranges of the tensors of a checkpoint directory's safetensors files (headers only are read)."""

    def __init__(self, model_dir) -> None:
        d = Path(model_dir)
        index = d / "model.safetensors.index.json"
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise MoeError(f"cannot parse {index}") from None
        else:
            names = ["model.safetensors"]
        self.files = [str(d / n) for n in names]
        self.tensors: dict[str, tuple[int, int, int, tuple[int, ...], str]] = {}
        for i, path in enumerate(self.files):
            try:
                with open(path, "rb") as fh:
                    (n,) = struct.unpack("<Q", fh.read(8))
                    if n > 100_000_000:
                        raise ValueError("header too large")
                    header = json.loads(fh.read(n))
            except (OSError, ValueError, struct.error) as e:
                raise MoeError(f"cannot read the safetensors header of {path}: {e}") from None
            for name, t in header.items():
                if name != "__metadata__":
                    a, b = t["data_offsets"]
                    self.tensors[name] = (i, 8 + n + a, 8 + n + b, tuple(t["shape"]), t["dtype"])

    def segments(self, parts: list[tuple[str, int | None]]) -> tuple[Segment, ...]:
        """Byte ranges of ``parts`` = [(tensor name, row in a fused [E, ...] tensor or None), ...] in order."""
        out = []
        for name, row in parts:
            if name not in self.tensors:
                raise MoeError(f"tensor {name} not found in the checkpoint's safetensors files")
            f, start, end, shape, _ = self.tensors[name]
            if row is None:
                out.append((f, start, end - start))
            else:
                per = (end - start) // shape[0]
                out.append((f, start + row * per, per))
        return Located(out, ", ".join(name if row is None else f"{name}[{row}]" for name, row in parts))
