"""Routing traces: the in-memory form, validation, and the on-disk format (version 1).

A trace records, per token, its sequence id, position and phase, and per MoE
layer the top-k expert ids in rank order (highest gate weight first) with their
weights; optionally, per named predictor, the experts it predicted at layer l
for layers l+1..l+D. See traces/FORMAT.md for the file layout.

Contract: ``load_trace`` returns only traces that pass ``Trace.validate``; every
problem with a file (missing, not a zip, truncated, unknown version, missing
key, bad metadata, inconsistent arrays) raises ``MoeError`` naming the file and
the problem. Before any array is read, each member's .npy header is checked:
a declared shape whose bytes the member cannot hold, or that exceed
``MAX_TRACE_BYTES``, is refused without allocating. Files are read with
``allow_pickle=False`` and written atomically (``moe_runtime.core.outputs``).
This module knows nothing about models or where traces come from.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from moe_runtime.core.config_files import bundled
from moe_runtime.core.errors import MoeError
from moe_runtime.core.outputs import write_atomic  # noqa: F401  (the one atomic writer; re-exported)
from moe_runtime.core.resources import check_fits
from moe_runtime.traces.checks import check_declared_size, check_array, check_ids

PHASE_PREFILL = 0
PHASE_DECODE = 1
FORMAT_VERSION = 1

_PRED_PREFIX = "pred."
_FLOAT16_MAX = float(np.finfo(np.float16).max)
MAX_TRACE_BYTES = 16 << 30  # all arrays of one trace file, as declared in their headers
_DEFLATE_MAX_RATIO = 1032  # deflate cannot expand data more than this


@dataclass(frozen=True)
class TraceMeta:
    """What the trace was recorded on; ``n_layers`` counts MoE layers only."""

    model: str
    n_layers: int
    n_experts: int
    top_k: int
    expert_bytes: int
    dtype: str
    source: str
    extra: dict = field(default_factory=dict)

    @classmethod
    def for_spec(cls, spec, source: str, extra: dict | None = None) -> "TraceMeta":
        """The metadata of a trace of the model ``spec`` (a ``core.shapes.ModelSpec``)."""
        return cls(model=spec.name, n_layers=spec.n_moe_layers, n_experts=spec.n_experts, top_k=spec.top_k,
                   expert_bytes=spec.expert_bytes, dtype=spec.dtype, source=source, extra=dict(extra or {}))

    def validate(self) -> None:
        for name in ("model", "dtype", "source"):
            if not isinstance(getattr(self, name), str):
                raise MoeError(f"meta.{name} must be a string, got {getattr(self, name)!r}")
        for name in ("n_layers", "n_experts", "top_k", "expert_bytes"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise MoeError(f"meta.{name} must be an integer, got {v!r}")
        if self.n_layers < 1 or self.n_experts < 1 or self.top_k < 1:
            raise MoeError(f"meta: n_layers, n_experts and top_k must be >= 1 "
                           f"(got {self.n_layers}, {self.n_experts}, {self.top_k})")
        if self.top_k > self.n_experts:
            raise MoeError(f"meta: top_k={self.top_k} exceeds n_experts={self.n_experts}")
        if self.n_experts > np.iinfo(np.int16).max:
            raise MoeError(f"meta: n_experts={self.n_experts} does not fit expert ids in int16")
        if self.expert_bytes < 0:
            raise MoeError(f"meta.expert_bytes must be >= 0, got {self.expert_bytes}")
        if not isinstance(self.extra, dict):
            raise MoeError(f"meta.extra must be a dict, got {type(self.extra).__name__}")
        try:
            json.dumps(self.extra)
        except (TypeError, ValueError) as e:
            raise MoeError(f"meta.extra is not JSON-serialisable: {e}") from None

    def to_json(self) -> str:
        # numpy scalars (e.g. counts computed with numpy) serialise as plain numbers
        return json.dumps(asdict(self), sort_keys=True,
                          default=_json_scalar)

    @classmethod
    def from_json(cls, text: str) -> "TraceMeta":
        """Parse and validate the metadata JSON; errors name the missing/unknown fields."""
        try:
            d = json.loads(text)
        except (TypeError, ValueError) as e:
            raise MoeError(f"metadata is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise MoeError("metadata must be a JSON object")
        names = [f.name for f in fields(cls)]
        required = [n for n in names if n != "extra"]
        missing = [n for n in required if n not in d]
        if missing:
            raise MoeError(f"metadata is missing field(s): {', '.join(missing)}")
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise MoeError(f"metadata has unknown field(s): {', '.join(unknown)}")
        meta = cls(**d)
        meta.validate()
        return meta


def _json_scalar(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


@dataclass(frozen=True)
class Trace:
    """A validated-on-demand routing trace; arrays are token-major.

    Construction does not validate (so it stays cheap); call ``validate()`` on a
    hand-built trace, or build it with ``make_trace`` (recorder.py), which
    coerces dtypes and validates.
    """

    meta: TraceMeta
    expert_ids: np.ndarray  # int16 [T, L, K], rank order (highest weight first)
    weights: np.ndarray  # float32 [T, L, K]
    seq_id: np.ndarray  # int32 [T]
    position: np.ndarray  # int32 [T]
    phase: np.ndarray  # int8 [T], PHASE_PREFILL or PHASE_DECODE
    # name -> int16 [T, L, D, P]: at layer l, ranked ids predicted for layer l+1+d; -1 = none
    predictions: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(self.expert_ids.shape[0])

    @property
    def n_layers(self) -> int:
        return self.meta.n_layers

    @property
    def n_experts(self) -> int:
        return self.meta.n_experts

    @property
    def top_k(self) -> int:
        return self.meta.top_k

    def check_model(self, what: str, *, n_layers: int, n_experts: int, top_k: int) -> None:
        """MoeError unless the trace was recorded on a model of this shape (a trace of another
        model would index experts that do not exist, or silently mean nothing)."""
        got, want = (self.n_layers, self.n_experts, self.top_k), (n_layers, n_experts, top_k)
        if got != want:
            raise MoeError(f"{what}: trace shape (MoE layers, experts, top-k) = {got} does not match the "
                           f"model's {want}")

    def lookahead(self, name: str) -> int:
        """Number of future layers (D) predictor ``name`` predicts for."""
        if name not in self.predictions:
            known = ", ".join(sorted(self.predictions)) or "none"
            raise MoeError(f"trace has no predictor {name!r} (has: {known})")
        return int(self.predictions[name].shape[2])

    def sequences(self) -> list[tuple[int, int, int]]:
        """Maximal runs of equal ``seq_id`` as (seq_id, start, stop), in token order."""
        s = self.seq_id
        if len(s) == 0:
            return []
        cuts = np.flatnonzero(s[1:] != s[:-1]) + 1
        starts = np.concatenate([[0], cuts])
        stops = np.concatenate([cuts, [len(s)]])
        return [(int(s[a]), int(a), int(b)) for a, b in zip(starts, stops)]

    def slice(self, start: int, stop: int) -> "Trace":
        """Tokens [start, stop) as a new trace (arrays are copies)."""
        if not (0 <= start < stop <= self.n_tokens):
            raise MoeError(f"bad token slice [{start}, {stop}) of a trace with {self.n_tokens} tokens")
        return Trace(
            meta=self.meta,
            expert_ids=self.expert_ids[start:stop].copy(),
            weights=self.weights[start:stop].copy(),
            seq_id=self.seq_id[start:stop].copy(),
            position=self.position[start:stop].copy(),
            phase=self.phase[start:stop].copy(),
            predictions={k: v[start:stop].copy() for k, v in self.predictions.items()},
        )

    def validate(self) -> None:
        """Raise MoeError naming the first problem found; return None if the trace is sound."""
        if not isinstance(self.meta, TraceMeta):
            raise MoeError("trace meta must be a TraceMeta")
        self.meta.validate()
        m = self.meta
        check_array("expert_ids", self.expert_ids, np.int16, 3)
        T, L, K = self.expert_ids.shape
        if T < 1:
            raise MoeError("trace has no tokens")
        if L != m.n_layers:
            raise MoeError(f"expert_ids has {L} layers but meta.n_layers={m.n_layers}")
        if K != m.top_k:
            raise MoeError(f"expert_ids has {K} experts per layer but meta.top_k={m.top_k}")
        check_array("weights", self.weights, np.float32, 3)
        if self.weights.shape != self.expert_ids.shape:
            raise MoeError(f"weights shape {self.weights.shape} != expert_ids shape {self.expert_ids.shape}")
        for name, arr, dt in (("seq_id", self.seq_id, np.int32), ("position", self.position, np.int32),
                              ("phase", self.phase, np.int8)):
            check_array(name, arr, dt, 1)
            if arr.shape[0] != T:
                raise MoeError(f"{name} has {arr.shape[0]} entries but the trace has {T} tokens")
        check_ids("expert_ids", self.expert_ids, m.n_experts, allow_none=False)
        if not np.all(np.isfinite(self.weights)):
            raise MoeError("weights contain NaN or infinite values")
        if np.any(self.weights < 0):
            t, l, k = np.argwhere(self.weights < 0)[0]
            raise MoeError(f"negative weight {self.weights[t, l, k]} at token {t}, layer {l}")
        if np.any(self.position < 0):
            raise MoeError(f"negative position at token {int(np.argmax(self.position < 0))}")
        bad = ~np.isin(self.phase, (PHASE_PREFILL, PHASE_DECODE))
        if np.any(bad):
            t = int(np.argmax(bad))
            raise MoeError(f"phase at token {t} is {int(self.phase[t])}, expected 0 (prefill) or 1 (decode)")
        if not isinstance(self.predictions, dict):
            raise MoeError("predictions must be a dict of name -> array")
        for name, arr in self.predictions.items():
            if not isinstance(name, str) or not name:
                raise MoeError(f"predictor name must be a non-empty string, got {name!r}")
            label = f"predictions[{name!r}]"
            check_array(label, arr, np.int16, 4)
            if arr.shape[:2] != (T, L):
                raise MoeError(f"{label} has shape {arr.shape}, expected [{T}, {L}, D, P]")
            if arr.shape[2] < 1 or arr.shape[3] < 1:
                raise MoeError(f"{label} has an empty lookahead or prediction axis: shape {arr.shape}")
            check_ids(label, arr, m.n_experts, allow_none=True)
            # at layer l, distance d targets layer l+1+d; past the last layer there is nothing to predict
            target = np.arange(L)[:, None] + 1 + np.arange(arr.shape[2])[None, :]  # [L, D]
            beyond = (target >= L)[None, :, :, None] & (arr != -1)
            if np.any(beyond):
                t, l, d, _ = np.argwhere(beyond)[0]
                raise MoeError(f"{label} predicts beyond the last layer at token {t}, layer {l}, distance {d}")


def save_trace(trace: Trace, path) -> None:
    """Validate and write ``trace`` to ``path`` as one compressed .npz, atomically.

    Weights are stored as float16 (they are gate probabilities; 3 significant
    digits is plenty for replay and statistics).
    """
    trace.validate()
    if trace.weights.size and float(trace.weights.max()) > _FLOAT16_MAX:
        raise MoeError(f"weights exceed the float16 range used on disk (max {float(trace.weights.max())})")
    arrays = {
        "format_version": np.array(FORMAT_VERSION, dtype=np.int32),
        "meta": np.array(trace.meta.to_json()),  # 0-d unicode array, loads without pickle
        "expert_ids": trace.expert_ids,
        "weights": trace.weights.astype(np.float16),
        "seq_id": trace.seq_id,
        "position": trace.position,
        "phase": trace.phase,
    }
    for name, arr in trace.predictions.items():
        arrays[_PRED_PREFIX + name] = arr
    write_atomic(path, lambda f: np.savez_compressed(f, **arrays))


def _trace_path(path) -> str:
    path = bundled(os.fspath(path))
    if not os.path.exists(path):
        raise MoeError(f"trace file not found: {path}")
    if os.path.isdir(path):
        raise MoeError(f"{path}: is a directory, not a trace file")
    if not os.path.isfile(path):  # a FIFO would block the read forever, a device never end
        raise MoeError(f"{path}: not a regular file, not a trace file")
    return path


def load_trace(path) -> Trace:
    """Read and validate a trace file; every problem raises MoeError naming ``path``. A relative path
    that is not found here but is in the checkout (``traces/...``) is the bundled file. The arrays'
    declared sizes are held against the memory this process may use before any is read."""
    path = _trace_path(path)
    try:
        return _load(path)
    except MoeError as e:
        raise MoeError(f"{path}: {e}") from None


@dataclass(frozen=True)
class TraceSummary:
    """What ``moe-trace info`` shows, read lazily: metadata, array shapes (from headers), and the per-token
    sequence ids and phases; the routing and prediction arrays are never decompressed."""

    meta: TraceMeta
    n_tokens: int
    seq_id: np.ndarray
    phase: np.ndarray
    predictions: dict  # name -> shape [T, L, D, P]

    def sequences(self) -> list[tuple[int, int, int]]:
        return Trace.sequences(self)  # the same rule, over seq_id alone


def trace_summary(path) -> TraceSummary:
    """A ``TraceSummary`` of ``path``: reads the meta, seq_id and phase members only (MoeError naming
    ``path`` on any problem). Memory is that of two [T] arrays, whatever the routing expands to."""
    path = _trace_path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic.startswith(b"\x93NUMPY"):
            raise MoeError("not a trace file (a single .npy array, not an .npz archive)")
        if not magic.startswith(b"PK"):
            raise MoeError("not a trace file (not a readable .npz archive)")
        shapes = _check_members(path, fits=False)
        for key in ("format_version", "meta", "expert_ids", "seq_id", "phase"):
            if key not in shapes:
                raise MoeError(f"missing key {key!r}")
        with np.load(path, allow_pickle=False) as data:
            meta_arr = _read(data, "meta")
            if meta_arr.shape != () or meta_arr.dtype.kind != "U":
                raise MoeError("'meta' must be a 0-d unicode array holding JSON")
            meta = TraceMeta.from_json(str(meta_arr))
            seq_id, phase = _read(data, "seq_id"), _read(data, "phase")
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, RuntimeError,
            NotImplementedError) as e:
        raise MoeError(f"{path}: corrupt, truncated or unreadable trace file ({_short(e)})") from None
    except MoeError as e:
        raise MoeError(f"{path}: {e}") from None
    T = shapes["expert_ids"][0][0] if shapes["expert_ids"][0] else 0
    if seq_id.shape != (T,) or phase.shape != (T,):
        raise MoeError(f"{path}: seq_id and phase must hold one entry per token ({T})")
    preds = {k[len(_PRED_PREFIX):]: tuple(v[0]) for k, v in shapes.items() if k.startswith(_PRED_PREFIX)}
    return TraceSummary(meta, T, seq_id, phase, preds)


def _load(path: str) -> Trace:
    try:
        with open(path, "rb") as f:  # numpy calls any other file "pickled data", which misleads
            magic = f.read(6)
        if magic.startswith(b"\x93NUMPY"):  # refused before numpy reads (and allocates) its array
            raise MoeError("not a trace file (a single .npy array, not an .npz archive)")
        if not magic.startswith(b"PK"):
            raise MoeError("not a trace file (not a readable .npz archive)")
        _check_members(path)
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError) as e:
        # RuntimeError: an encrypted member; NotImplementedError: an unknown compression method
        raise MoeError(f"not a trace file (not a readable .npz archive: {_short(e)})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise MoeError("not a trace file (a single .npy array, not an .npz archive)")
    try:
        with data:
            keys = set(data.files)
            if "format_version" not in keys:
                raise MoeError("not a trace file (no 'format_version' key)")
            version = _read(data, "format_version")
            if version.shape != () or version.dtype.kind not in "iu":
                raise MoeError(f"format_version must be a scalar integer, got {version!r}")
            if int(version) != FORMAT_VERSION:
                raise MoeError(f"unknown trace format version {int(version)} (this reader knows {FORMAT_VERSION})")
            for key in ("meta", "expert_ids", "weights", "seq_id", "position", "phase"):
                if key not in keys:
                    raise MoeError(f"missing key {key!r}")
            meta_arr = _read(data, "meta")
            if meta_arr.shape != () or meta_arr.dtype.kind != "U":
                raise MoeError("'meta' must be a 0-d unicode array holding JSON")
            meta = TraceMeta.from_json(str(meta_arr))
            weights = _read(data, "weights")
            if weights.dtype.kind != "f":
                raise MoeError(f"weights has dtype {weights.dtype}, expected float16")
            trace = Trace(
                meta=meta,
                expert_ids=_read(data, "expert_ids"),
                weights=weights.astype(np.float32),
                seq_id=_read(data, "seq_id"),
                position=_read(data, "position"),
                phase=_read(data, "phase"),
                predictions={k[len(_PRED_PREFIX):]: _read(data, k) for k in sorted(keys)
                             if k.startswith(_PRED_PREFIX)},
            )
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, RuntimeError,
            NotImplementedError) as e:
        raise MoeError(f"corrupt, truncated or unreadable trace file ({_short(e)})") from None
    unknown = sorted(k for k in keys - {"format_version", "meta", "expert_ids", "weights", "seq_id",
                                        "position", "phase"} if not k.startswith(_PRED_PREFIX))
    if unknown:
        raise MoeError(f"unknown key(s) in trace file: {', '.join(unknown)}")
    trace.validate()
    return trace


def _check_members(path: str, fits: bool = True) -> dict:
    """Read each .npy member's header, not its data, and refuse a declared size the file cannot hold.

    numpy allocates the declared shape before reading a zip member, so this runs first. Raises
    MoeError naming the array; zip and header errors propagate to the caller's handler. Returns
    {array name: (shape, dtype)}; with ``fits``, the whole expansion (float16 weights read as float32) is
    held against the memory this process may use (``resources.check_fits``).
    """
    total, shapes = 0, {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[:-4]
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                elif version in ((2, 0), (3, 0)):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise MoeError(f"array {name!r} has an unknown .npy version {version}")
                header = f.tell()
            if info.compress_type == zipfile.ZIP_STORED:
                most = info.compress_size
            else:
                most = info.compress_size * _DEFLATE_MAX_RATIO + 1024
            size = check_declared_size(name, shape, dtype, min(info.file_size, most) - header)
            total += size * (3 if name == "weights" else 1)  # float16 read, then a float32 copy
            shapes[name] = (shape, dtype)
    if total > MAX_TRACE_BYTES:
        raise MoeError(f"arrays declare {total:,} bytes in all, over the {MAX_TRACE_BYTES >> 30} GiB "
                       "a trace file may hold")
    if fits:
        check_fits(f"the trace's arrays, as their headers declare ({total:,} bytes)", total)
    return shapes


def _read(data, key: str) -> np.ndarray:
    return np.asarray(data[key])


def _short(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]

