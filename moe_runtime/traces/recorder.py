"""Building traces: ``make_trace`` from array-likes, ``TraceRecorder`` one token at a time.

Contract: both return only validated traces (``Trace.validate``), with arrays
cast to the format's dtypes; values that do not fit a dtype are rejected, never
wrapped. The executor records with ``TraceRecorder`` while decoding. Knows
nothing about files beyond calling ``save_trace``.
"""

from __future__ import annotations

import numpy as np

from moe_runtime.core.errors import MoeError
from moe_runtime.traces.format import PHASE_DECODE, PHASE_PREFILL, Trace, TraceMeta, save_trace
from moe_runtime.traces.checks import cast_int


def make_trace(meta: TraceMeta, expert_ids, weights, seq_id=None, position=None, phase=None,
               predictions: dict | None = None) -> Trace:
    """Build a trace from array-likes, casting to the format's dtypes, and validate it.

    Defaults: one sequence (id 0), positions 0..T-1, all decode. Ids that do not
    fit the target dtype are rejected rather than wrapped.
    """
    ids = np.asarray(expert_ids)
    T = ids.shape[0] if ids.ndim >= 1 else 0
    seq_id = np.zeros(T) if seq_id is None else seq_id
    position = np.arange(T) if position is None else position
    phase = np.full(T, PHASE_DECODE) if phase is None else phase
    trace = Trace(
        meta=meta,
        expert_ids=cast_int(ids, np.int16, "expert_ids"),
        weights=np.asarray(weights, dtype=np.float32),
        seq_id=cast_int(seq_id, np.int32, "seq_id"),
        position=cast_int(position, np.int32, "position"),
        phase=cast_int(phase, np.int8, "phase"),
        predictions={k: cast_int(v, np.int16, f"predictions[{k!r}]") for k, v in (predictions or {}).items()},
    )
    trace.validate()
    return trace


class TraceRecorder:
    """Collects one token at a time (as the executor decodes) and builds a Trace.

    Every token must give the same predictor names with the same [L, D, P] shapes.
    """

    def __init__(self, meta: TraceMeta):
        meta.validate()
        self.meta = meta
        self._ids: list[np.ndarray] = []
        self._weights: list[np.ndarray] = []
        self._seq: list[int] = []
        self._pos: list[int] = []
        self._phase: list[int] = []
        self._preds: dict[str, list[np.ndarray]] | None = None

    def __len__(self) -> int:
        return len(self._ids)

    def add_token(self, seq_id: int, position: int, phase: int, expert_ids, weights,
                  predictions: dict | None = None) -> None:
        L, K = self.meta.n_layers, self.meta.top_k
        t = len(self._ids)
        ids = np.asarray(expert_ids)
        w = np.asarray(weights, dtype=np.float32)
        if ids.shape != (L, K) or w.shape != (L, K):
            raise MoeError(f"token {t}: expert_ids {ids.shape} and weights {w.shape} must both be [{L}, {K}]")
        if phase not in (PHASE_PREFILL, PHASE_DECODE):
            raise MoeError(f"token {t}: phase {phase!r} is not 0 (prefill) or 1 (decode)")
        preds = predictions or {}
        if self._preds is None:
            self._preds = {name: [] for name in preds}
        if set(preds) != set(self._preds):
            raise MoeError(f"token {t}: predictors {sorted(preds)} differ from earlier tokens' {sorted(self._preds)}")
        for name, arr in preds.items():
            arr = np.asarray(arr)
            if arr.ndim != 3 or arr.shape[0] != L:
                raise MoeError(f"token {t}: prediction {name!r} has shape {arr.shape}, expected [{L}, D, P]")
            if self._preds[name] and arr.shape != self._preds[name][0].shape:
                raise MoeError(f"token {t}: prediction {name!r} shape {arr.shape} differs from earlier "
                               f"{self._preds[name][0].shape}")
            self._preds[name].append(cast_int(arr, np.int16, f"prediction {name!r}"))
        self._ids.append(cast_int(ids, np.int16, "expert_ids"))
        self._weights.append(w)
        self._seq.append(int(seq_id))
        self._pos.append(int(position))
        self._phase.append(int(phase))

    def to_trace(self) -> Trace:
        if not self._ids:
            raise MoeError("no tokens recorded")
        # a batch decodes its sequences' tokens interleaved; the file keeps each sequence contiguous
        order = np.argsort(np.asarray(self._seq), kind="stable")
        pick = lambda xs: np.stack(xs)[order]  # noqa: E731
        return make_trace(
            self.meta, pick(self._ids), pick(self._weights), np.asarray(self._seq)[order],
            np.asarray(self._pos)[order], np.asarray(self._phase)[order],
            {k: pick(v) for k, v in (self._preds or {}).items()},
        )

    def save(self, path) -> None:
        save_trace(self.to_trace(), path)
