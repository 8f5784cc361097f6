"""Importers: routing recorded by other systems -> moe-offload traces (format v1).

Two source formats, detected from the file's first bytes:

- ``esft-npz``: layer-major arrays as in shared/data/deepseek-v2-lite-esft
  (``expert_ids`` int [L, T, K] unsorted, ``gate_weights`` [L, T, K],
  ``seq_lens`` [S], ``layer_index`` [L] model layers). Teacher-forced, so every
  token is a prefill token; positions restart at 0 for each sequence.
- ``routing-jsonl``: one JSON object per (token, layer) as in
  shared/data/mixtral-8x7b-vllm (``problem_id``, ``token_idx``, ``layer``,
  ``experts``, ``gating_probs``, optional ``dataset``). Generated tokens, so
  phase decode; position = ``token_idx``.

Experts are put in rank order (weight descending, ties keep the recorded
order). Tokens that miss some layers are dropped and counted in the result and
in ``meta.extra``; nothing else is changed. The model spec must agree with the
data (MoE layers, experts, top-k) or the import fails with a message saying how.
This module knows nothing about the command line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from dataclasses import dataclass

import numpy as np

from moe_runtime.core.errors import MoeError
from moe_runtime.core.config_files import input_file
from moe_runtime.core.shapes import ModelSpec
from moe_runtime.traces.format import PHASE_DECODE, PHASE_PREFILL, Trace, TraceMeta
from moe_runtime.traces.recorder import make_trace

ESFT_KEYS = ("expert_ids", "gate_weights", "seq_lens", "layer_index")
JSONL_KEYS = ("problem_id", "token_idx", "layer", "experts", "gating_probs")


@dataclass(frozen=True)
class ImportResult:
    trace: Trace
    source_format: str  # "esft-npz" | "routing-jsonl"
    dropped_tokens: int  # tokens left out because they missed some layers
    dropped: tuple  # (sequence, token_idx, layers present) of each dropped token


def detect_format(path: str) -> str:
    """"esft-npz" or "routing-jsonl", from the first bytes of the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except FileNotFoundError:
        raise MoeError(f"source file not found: {path}") from None
    except IsADirectoryError:
        raise MoeError(f"{path}: is a directory, not a routing file") from None
    if head.startswith(b"PK"):
        return "esft-npz"
    if head.lstrip().startswith(b"{"):
        return "routing-jsonl"
    raise MoeError(f"{path}: unrecognised routing format (neither an .npz archive nor JSON lines)")


def import_routing(path, spec: ModelSpec, source: str | None = None) -> ImportResult:
    """Import ``path`` (format detected) as a trace of ``spec``'s model.

    ``source`` replaces the default ``meta.source`` (a description of the file).
    """
    path = input_file(os.fspath(path), "source file")  # a FIFO would block detect_format's open
    fmt = detect_format(path)
    try:
        r = import_esft_npz(path, spec) if fmt == "esft-npz" else import_routing_jsonl(path, spec)
    except MoeError as e:
        raise MoeError(f"{path}: {e}") from None
    if source is not None:
        r = dataclasses.replace(r, trace=dataclasses.replace(
            r.trace, meta=dataclasses.replace(r.trace.meta, source=source,
                                              extra={**r.trace.meta.extra, "imported_from": os.path.basename(path)})))
    return r


def _rank(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-weights, axis=-1, kind="stable")  # ties keep the recorded order
    return np.take_along_axis(ids, order, -1), np.take_along_axis(weights, order, -1)


def _check_shape(spec: ModelSpec, n_layers: int, top_k: int, max_id: int, min_id: int) -> None:
    if n_layers != spec.n_moe_layers:
        raise MoeError(f"data has {n_layers} MoE layers but model {spec.name} has {spec.n_moe_layers}")
    if top_k != spec.top_k:
        raise MoeError(f"data has top-{top_k} routing but model {spec.name} has top_k={spec.top_k}")
    if min_id < 0 or max_id >= spec.n_experts:
        raise MoeError(f"data has expert ids in [{min_id}, {max_id}] but model {spec.name} "
                       f"has {spec.n_experts} experts")


def import_esft_npz(path: str, spec: ModelSpec) -> ImportResult:
    try:
        with np.load(path, allow_pickle=False) as d:
            if "format_version" in d.files:
                raise MoeError("already a moe-offload trace; nothing to import")
            missing = [k for k in ESFT_KEYS if k not in d.files]
            if missing:
                raise MoeError(f"not a layer-major routing npz: missing key(s) {', '.join(missing)}")
            ids, w, seq_lens, layer_index = (np.asarray(d[k]) for k in ESFT_KEYS)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise MoeError(f"unreadable npz ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if ids.ndim != 3 or w.shape != ids.shape or ids.dtype.kind not in "iu" or w.dtype.kind != "f":
        raise MoeError(f"expert_ids {ids.dtype}{list(ids.shape)} and gate_weights {w.dtype}{list(w.shape)} "
                       "must be integer and float arrays of one shape [L, T, K]")
    L, T, K = ids.shape
    if seq_lens.ndim != 1 or seq_lens.dtype.kind not in "iu" or np.any(seq_lens < 1):
        raise MoeError("seq_lens must be a 1-d array of positive integers")
    if int(seq_lens.sum()) != T:
        raise MoeError(f"seq_lens sum to {int(seq_lens.sum())} but the arrays have {T} tokens")
    if layer_index.shape != (L,):
        raise MoeError(f"layer_index has shape {list(layer_index.shape)}, expected [{L}]")
    _check_shape(spec, L, K, int(ids.max()), int(ids.min()))
    if tuple(int(i) for i in layer_index) != spec.moe_layers:
        raise MoeError(f"layer_index {layer_index.tolist()} differs from model {spec.name}'s MoE layers "
                       f"{list(spec.moe_layers)}")
    ids, w = _rank(ids.transpose(1, 0, 2).astype(np.int16), w.transpose(1, 0, 2).astype(np.float32))
    seq_id = np.repeat(np.arange(len(seq_lens)), seq_lens)
    starts = np.repeat(np.cumsum(seq_lens) - seq_lens, seq_lens)
    position = np.arange(T) - starts
    meta = TraceMeta.for_spec(spec,
        source=f"imported from {os.path.basename(path)} (layer-major routing npz, teacher-forced)",
        extra={"importer": "esft-npz", "model_layers": [int(i) for i in layer_index], "dropped_tokens": 0})
    trace = make_trace(meta, ids, w, seq_id, position, np.full(T, PHASE_PREFILL))
    return ImportResult(trace, "esft-npz", 0, ())


def import_routing_jsonl(path: str, spec: ModelSpec) -> ImportResult:
    """Group per-(token, layer) rows into tokens; drop (and count) tokens missing layers."""
    tokens: dict[tuple, dict[int, tuple]] = {}  # (sequence key, token_idx) -> layer -> (ids, probs)
    seq_order: dict[tuple, int] = {}
    layers_seen = set()
    try:
        _read_jsonl(path, spec, tokens, seq_order, layers_seen)
    except UnicodeDecodeError as e:
        raise MoeError(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    return _assemble(path, spec, tokens, seq_order, layers_seen)


def _read_jsonl(path, spec, tokens, seq_order, layers_seen) -> None:
    L, K = spec.n_moe_layers, spec.top_k
    with open(path, encoding="utf-8", errors="strict") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise MoeError(f"line {n}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise MoeError(f"line {n}: expected a JSON object")
            missing = [k for k in JSONL_KEYS if k not in row]
            if missing:
                raise MoeError(f"line {n}: missing field(s) {', '.join(missing)}")
            layer, tok, experts, probs = row["layer"], row["token_idx"], row["experts"], row["gating_probs"]
            if not isinstance(row["problem_id"], (int, str)) or isinstance(row["problem_id"], bool):
                raise MoeError(f"line {n}: problem_id must be an integer or a string")
            if not (isinstance(layer, int) and isinstance(tok, int) and tok >= 0) \
                    or isinstance(layer, bool) or isinstance(tok, bool):
                raise MoeError(f"line {n}: layer and token_idx must be integers (token_idx >= 0)")
            if not (isinstance(experts, list) and isinstance(probs, list) and len(experts) == len(probs)
                    and all(isinstance(e, int) and not isinstance(e, bool) for e in experts)
                    and all(isinstance(p, (int, float)) for p in probs)):
                raise MoeError(f"line {n}: experts and gating_probs must be lists of equal length "
                               "(integers, numbers)")
            if len(experts) != K:
                raise MoeError(f"line {n}: data has top-{len(experts)} routing but model {spec.name} "
                               f"has top_k={K}")
            if not 0 <= layer < L:
                raise MoeError(f"line {n}: layer {layer} is outside model {spec.name}'s {L} MoE layers")
            if any(not 0 <= e < spec.n_experts for e in experts):
                raise MoeError(f"line {n}: expert id in {experts} outside model {spec.name}'s "
                               f"{spec.n_experts} experts")
            seq = (str(row.get("dataset", "")), row["problem_id"])
            seq_order.setdefault(seq, len(seq_order))
            per_layer = tokens.setdefault((seq, tok), {})
            if layer in per_layer:
                raise MoeError(f"line {n}: second row for problem {seq[1]!r} token {tok} layer {layer}")
            per_layer[layer] = (experts, probs)
            layers_seen.add(layer)


def _assemble(path, spec, tokens, seq_order, layers_seen) -> ImportResult:
    L = spec.n_moe_layers
    if not tokens:
        raise MoeError("no routing rows")
    if layers_seen != set(range(L)):
        raise MoeError(f"data has layers {min(layers_seen)}..{max(layers_seen)} ({len(layers_seen)} distinct) "
                       f"but model {spec.name} has {L} MoE layers")
    keys = sorted(tokens, key=lambda k: (seq_order[k[0]], k[1]))
    complete = [k for k in keys if len(tokens[k]) == L]
    dropped = tuple((k[0][1], k[1], len(tokens[k])) for k in keys if len(tokens[k]) < L)
    if not complete:
        raise MoeError(f"no token has all {L} layers")
    ids = np.array([[tokens[k][l][0] for l in range(L)] for k in complete], dtype=np.int16)
    w = np.array([[tokens[k][l][1] for l in range(L)] for k in complete], dtype=np.float32)
    ids, w = _rank(ids, w)
    # problem ids become sequence ids when they are plain integers from one dataset
    datasets = sorted({s[0] for s in seq_order})
    pids = [s[1] for s in seq_order]
    use_pid = len(datasets) == 1 and all(isinstance(p, int) and 0 <= p < 2**31 for p in pids) \
        and len(set(pids)) == len(pids)
    seq_id = [k[0][1] if use_pid else seq_order[k[0]] for k in complete]
    extra = {"importer": "routing-jsonl", "datasets": datasets, "dropped_tokens": len(dropped),
             "dropped": [list(x) for x in dropped], "model_layers": list(spec.moe_layers)}
    if not use_pid:
        extra["sequences"] = [[s[0], s[1]] for s in seq_order]
    meta = TraceMeta.for_spec(spec, source=f"imported from {os.path.basename(path)} (per-(token, layer) routing "
                                  f"JSON lines, generated tokens)", extra=extra)
    trace = make_trace(meta, ids, w, seq_id, [k[1] for k in complete], np.full(len(complete), PHASE_DECODE))
    return ImportResult(trace, "routing-jsonl", len(dropped), dropped)
