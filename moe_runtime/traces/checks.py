"""Array checks shared by trace validation, building and recording.

Each raises MoeError naming the array and the first offending index (or, for
``check_declared_size``, its declared shape). Knows nothing about files or
trace metadata.
"""

from __future__ import annotations

import numpy as np

from moe_runtime.core.errors import MoeError


def check_array(name: str, arr, dtype, ndim: int) -> None:
    if not isinstance(arr, np.ndarray):
        raise MoeError(f"{name} must be a numpy array, got {type(arr).__name__}")
    if arr.dtype != dtype:
        raise MoeError(f"{name} has dtype {arr.dtype}, expected {np.dtype(dtype)}")
    if arr.ndim != ndim:
        raise MoeError(f"{name} has {arr.ndim} dimensions (shape {arr.shape}), expected {ndim}")


def check_ids(name: str, ids: np.ndarray, n_experts: int, allow_none: bool) -> None:
    """Ids in [0, n_experts) (or -1 if allowed), no repeats along the last axis."""
    lo = -1 if allow_none else 0
    bad = (ids < lo) | (ids >= n_experts)
    if np.any(bad):
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise MoeError(f"{name} has expert id {int(ids[idx])} out of range [{lo}, {n_experts}) at index {idx}")
    s = np.sort(ids, axis=-1)
    dup = (s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)
    if np.any(dup):
        idx = tuple(int(i) for i in np.argwhere(dup)[0][:-1])
        raise MoeError(f"{name} repeats an expert id within one (token, layer) at index {idx}")


def check_declared_size(name: str, shape: tuple, dtype, available: int) -> int:
    """Bytes an array of ``shape`` x ``dtype`` needs; MoeError naming it when that exceeds ``available``
    (what its file can hold) or the dtype needs pickle. Counts with Python ints: no overflow."""
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise MoeError(f"array {name!r} holds Python objects (Object arrays cannot be loaded without pickle, "
                       "which traces never use)")
    n = 1
    for d in shape:
        n *= int(d)
    need = n * dtype.itemsize
    if need > max(available, 0):
        shown = str(tuple(shape))
        shown = shown if len(shown) <= 80 else shown[:77] + "..."  # a forged header may list 1000s of dims
        size = f"{need:,} bytes" if need < 10**15 else "over a petabyte"
        raise MoeError(f"array {name!r} declares shape {shown} of {dtype} ({size}) but its file holds at "
                       f"most {max(available, 0):,} bytes (truncated or forged header)")
    return need


def cast_int(a, dtype, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.size and a.dtype.kind not in "iu":
        if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            pass
        else:
            raise MoeError(f"{name} must hold integers, got dtype {a.dtype}")
    info = np.iinfo(dtype)
    if a.size and (a.min() < info.min or a.max() > info.max):
        raise MoeError(f"{name} has values outside the range of {np.dtype(dtype)}")
    return a.astype(dtype)
