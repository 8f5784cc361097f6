"""Typed reads of Hugging Face config.json fields.

Contract: each reader takes the config dict and a key and returns the value
with its type checked, or raises ``MoeError`` naming the field. A key that is
absent or null takes the given default; ``read_int`` without a default
requires the key. This module knows no model family and does no I/O.
"""

from __future__ import annotations

from typing import Any

from moe_runtime.errors import MoeError


def read_int(d: dict, key: str, default: int | None = None) -> int:
    v = d.get(key, default)
    if v is None:
        raise MoeError(f"config: missing field {key!r}")
    if not isinstance(v, int) or isinstance(v, bool):
        raise MoeError(f"config: {key} must be an integer, got {v!r}")
    return v


def read_float(d: dict, key: str, default: float) -> float:
    v = d.get(key, default)
    if v is None:
        v = default
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise MoeError(f"config: {key} must be a number, got {v!r}")
    return float(v)


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


def read_rope_theta(d: dict, default: float) -> float:
    """RoPE base: transformers 5 writes ``rope_parameters``; older configs ``rope_theta``/``rope_scaling``."""
    params = d.get("rope_parameters")
    if params is None:
        params = d.get("rope_scaling") or {}
        if not isinstance(params, dict):
            raise MoeError(f"config: rope_scaling must be an object or null, got {params!r}")
        params = {**params, "rope_theta": d.get("rope_theta", params.get("rope_theta", default))}
    if not isinstance(params, dict):
        raise MoeError(f"config: rope_parameters must be an object, got {params!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise MoeError(f"config: rope_type {kind!r} is not supported (only default RoPE)")
    return read_float(params, "rope_theta", default)


def eos_ids_from(value: Any, where: str) -> tuple[int, ...]:
    """An ``eos_token_id`` entry (int, list of ints or null) as a tuple."""
    if value is None:
        return ()
    vals = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        raise MoeError(f"{where}: eos_token_id must be an integer or a list of integers, got {value!r}")
    return tuple(vals)
