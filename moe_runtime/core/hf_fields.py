"""Typed reads of Hugging Face config.json fields.

Contract: each reader takes the config dict and a key and returns the value
with its type and range checked, or raises ``MoeError`` naming the field. A key
that is absent or null takes the given default; ``read_int`` without a default
requires the key. Integers lie in [lo, MAX_INT] (default lo 0 for sizes);
numbers are finite and at least ``lo``. This module knows no model family and
does no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from moe_runtime.core.errors import MoeError


MAX_INT = 1 << 40  # far above any real size or id; below what would overflow a size product
# torch_dtype names a real checkpoint may carry (compute dtypes, and others read from the safetensors header)
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64", "float8_e4m3fn", "float8_e5m2", "int8", "uint8")


def _show(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def read_int(d: dict, key: str, default: int | None = None, lo: int = 0) -> int:
    v = d.get(key, default)
    if v is None:
        raise MoeError(f"config: missing field {key!r}")
    if not isinstance(v, int) or isinstance(v, bool):
        raise MoeError(f"config: {key} must be an integer, got {_show(v)}")
    if not lo <= v <= MAX_INT:
        raise MoeError(f"config: {key} must be an integer in [{lo}, {MAX_INT}], got {_show(v)}")
    return v


def read_float(d: dict, key: str, default: float, lo: float = float("-inf"), lo_open: bool = False) -> float:
    """A finite number >= ``lo`` (> ``lo`` with ``lo_open``)."""
    v = d.get(key, default)
    if v is None:
        v = default
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise MoeError(f"config: {key} must be a number, got {_show(v)}")
    try:
        f = float(v)
    except OverflowError:
        f = float("inf")
    if not math.isfinite(f) or f < lo or (lo_open and f == lo):
        bound = "" if lo == float("-inf") else f" {'>' if lo_open else '>='} {lo:g}"
        raise MoeError(f"config: {key} must be a finite number{bound}, got {_show(v)}")
    return f


def read_dtype_name(d: dict) -> str | None:
    """``torch_dtype`` (or ``dtype``): one of ``DTYPE_NAMES``, or None when absent."""
    key = "torch_dtype" if d.get("torch_dtype") is not None else "dtype"
    v = d.get(key)
    if v is None:
        return None
    if v not in DTYPE_NAMES:
        raise MoeError(f"config: {key} must be one of {', '.join(DTYPE_NAMES)}, got {_show(v)}")
    return v


def read_bool(d: dict, key: str, default: bool) -> bool:
    v = d.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise MoeError(f"config: {key} must be true or false, got {v!r}")
    return v


def read_int_list(d: dict, key: str) -> list[int]:
    """A list of integers; absent or null reads as empty."""
    v = d.get(key) or []
    if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        raise MoeError(f"config: {key} must be a list of integers, got {v!r}")
    return v


@dataclass(frozen=True)
class Yarn:
    """YaRN RoPE scaling as transformers 5.23 reads ``rope_parameters`` (rope_type yarn)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0  # with mscale_all_dim, the attention factor is mscale(mscale) / mscale(mscale_all_dim)
    mscale_all_dim: float = 0.0  # MLA also scales its softmax by mscale(mscale_all_dim)^2
    attention_factor: float | None = None  # scales cos/sin; None: derived as above
    truncate: bool = True


def read_rope(d: dict, default: float, allow_yarn: bool = False,
              defaults: dict | None = None) -> tuple[float, Yarn | None, float]:
    """(theta, yarn or None, partial_rotary_factor) of a config.

    transformers 5 writes ``rope_parameters``; older configs ``rope_theta``/``rope_scaling``. ``defaults``
    stands in for an absent ``rope_parameters``/``rope_scaling`` (GPT-OSS's config class supplies YaRN)."""
    params = d.get("rope_parameters")
    if params is None:
        params = d.get("rope_scaling") or dict(defaults or {})
        if not isinstance(params, dict):
            raise MoeError(f"config: rope_scaling must be an object or null, got {params!r}")
        params = {**params, "rope_theta": d.get("rope_theta", params.get("rope_theta", default))}
    if not isinstance(params, dict):
        raise MoeError(f"config: rope_parameters must be an object, got {params!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    theta = read_float(params, "rope_theta", default, lo=0, lo_open=True)
    partial = read_float(params, "partial_rotary_factor", read_float(d, "partial_rotary_factor", 1.0))
    if not 0.0 < partial <= 1.0:
        raise MoeError(f"config: partial_rotary_factor must be in (0, 1], got {partial}")
    if kind == "default":
        return theta, None, partial
    if kind != "yarn" or not allow_yarn:
        raise MoeError(f"config: rope_type {kind!r} is not supported for {d.get('model_type')} "
                       f"(supported: default{', yarn' if allow_yarn else ''})")
    max_pos = read_int(d, "max_position_embeddings", 4096)
    orig = read_int(params, "original_max_position_embeddings", d.get("original_max_position_embeddings") or max_pos)
    factor = params.get("factor")
    factor = max_pos / orig if factor is None else read_float(params, "factor", 1.0)
    af = params.get("attention_factor")
    yarn = Yarn(factor=factor, original_max_position_embeddings=orig,
                beta_fast=read_float(params, "beta_fast", 32.0) or 32.0,
                beta_slow=read_float(params, "beta_slow", 1.0) or 1.0,
                mscale=read_float(params, "mscale", 0.0), mscale_all_dim=read_float(params, "mscale_all_dim", 0.0),
                attention_factor=None if af is None else read_float(params, "attention_factor", 1.0),
                truncate=read_bool(params, "truncate", True))
    if yarn.factor <= 0 or orig <= 0:
        raise MoeError("config: rope_parameters factor and original_max_position_embeddings must be positive")
    return theta, yarn, partial


def eos_ids_from(value: Any, where: str) -> tuple[int, ...]:
    """An ``eos_token_id`` entry (int, list of ints or null) as a tuple."""
    if value is None:
        return ()
    vals = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_INT for v in vals):
        raise MoeError(f"{where}: eos_token_id must be a token id (an integer >= 0) or a list of them, got "
                       f"{_show(value)}")
    return tuple(vals)
