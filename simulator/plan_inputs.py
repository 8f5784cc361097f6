"""What a plan simulates on: the routing trace, the host (profile and RAM), and measured predictor quality.

- ``choose_trace``: the routing trace of the model, in this order: the one given
  (``--trace``); a bundled trace of the same model (``traces/*.npz`` whose
  ``meta.model`` is the model's name; the longest); else a synthetic trace
  (``moe_runtime.traces.synth``) whose three knobs are fitted to the bundled
  trace of the closest shape (top-k / experts) and which takes the model's own
  shape (layers, experts, top-k). A trace with fewer sequences than the batch
  is replaced by a synthetic one fitted to it with enough sequences. Fitted
  knobs of the bundled traces are checked in (``traces/fitted-knobs.json``,
  ``write_bundled_knobs``), others kept under ``out/cache/plan`` (by content). The
  returned ``TraceChoice`` says which it is, in words.
- ``host_ram_bytes``: this machine's physical memory (``os.sysconf``).
- ``default_host_profile``: ``out/host.yaml`` when a measured profile of this
  machine was written there (`moe-runtime profile --host-out out/host.yaml`),
  else the bundled nominal ``DEFAULT_HOST_PROFILE``; the plan prints which.
- ``load_predictor_quality``: recall and precision per router-based predictor
  from the JSON of ``moe-runtime eval-predictors --json``.

This module knows nothing about search or replays.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from moe_runtime.core import config_files
from moe_runtime.core.errors import MoeError
from moe_runtime.core.options import DEFAULT_HOST_PROFILE
from moe_runtime.core.outputs import write_json_atomic
from moe_runtime.traces import load_trace
from moe_runtime.traces.format import TraceMeta
from moe_runtime.traces.synth import SynthKnobs, fit_knobs, synth_trace

TRACES_DIR = config_files.REPO / "traces"
CACHE_DIR = Path("out/cache/plan")
KNOBS_FILE = TRACES_DIR / "fitted-knobs.json"
LOCAL_HOST = Path("out/host.yaml")  # where `moe-runtime profile --host-out` is told to write this machine's
ROUTER_PREDICTORS = ("gate", "aligned")  # read hidden states: modelled as noisy-oracle from measured quality


@dataclass(frozen=True)
class TraceChoice:
    trace: object  # moe_runtime.traces.Trace, cut to the tokens simulated
    kind: str  # given | bundled | synthetic
    source: str  # the file, or the file the synthetic trace was fitted to
    words: str  # what the plan prints and writes under expected.trace


def bundled_traces() -> dict[str, list[Path]]:
    """model name -> bundled trace files of it (largest first)."""
    out: dict[str, list[Path]] = {}
    for p in sorted(TRACES_DIR.glob("*.npz")):
        try:
            t = load_trace(p)
        except MoeError:
            continue
        out.setdefault(t.meta.model, []).append((t.n_tokens, p))
    return {m: [p for _, p in sorted(v, key=lambda x: (-x[0], str(x[1])))] for m, v in out.items()}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _fitted_knobs(path: Path) -> SynthKnobs:
    """The synthetic knobs fitted to the trace at ``path``: from ``traces/fitted-knobs.json`` (the bundled
    traces' fits, checked in) or the cache when either holds them for this file's content, else fitted."""
    digest = _digest(path)
    try:
        entry = json.loads(KNOBS_FILE.read_text()).get(path.name, {})
        if entry.get("sha256") == digest:
            return SynthKnobs(**entry["knobs"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError, MoeError):
        pass
    key = CACHE_DIR / f"knobs-{path.stem}-{digest}.json"
    try:
        return SynthKnobs(**json.loads(key.read_text()))
    except (OSError, ValueError, TypeError, MoeError):
        pass
    knobs = fit_knobs(load_trace(path))
    try:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        write_json_atomic(key, knobs.__dict__)
    except (OSError, MoeError):
        pass  # a cache that cannot be written only costs time
    return knobs


def write_bundled_knobs() -> dict:
    """Fit every bundled trace and write ``traces/fitted-knobs.json`` (run after a bundled trace changes)."""
    out = {p.name: {"sha256": _digest(p), "knobs": _fitted_knobs(p).__dict__} for p in sorted(TRACES_DIR.glob("*.npz"))}
    write_json_atomic(KNOBS_FILE, out)
    return out


def _closest(spec, traces: dict[str, list[Path]]) -> Path:
    """The bundled trace whose model's routing density (top-k / experts) is closest to ``spec``'s."""
    best = None
    for files in traces.values():
        t = load_trace(files[0])
        d = abs(t.top_k / t.n_experts - spec.top_k / spec.n_experts)
        if best is None or d < best[0]:
            best = (d, files[0])
    if best is None:
        raise MoeError(f"no bundled trace in {TRACES_DIR} to fit a synthetic trace to; give --trace FILE")
    return best[1]


def _synthetic(spec, fitted_to: Path, tokens: int, batch: int, seed: int):
    knobs = _fitted_knobs(fitted_to)
    real = load_trace(fitted_to)
    seq_len = max(1, round(real.n_tokens / len(real.sequences())))
    n_seqs = max(batch, -(-tokens // seq_len))
    seq_len = max(1, -(-tokens // n_seqs))  # at least `batch` sequences over `tokens` tokens
    meta = TraceMeta.for_spec(spec, source=f"synthetic, fitted to {fitted_to.name}",
                              extra={"knobs": knobs.__dict__, "seed": seed})
    return synth_trace(meta, n_seqs * seq_len, knobs, seed, seq_len=seq_len), knobs


def choose_trace(spec, *, trace_path: str | None, tokens: int, batch: int, seed: int = 0) -> TraceChoice:
    """The trace to simulate ``spec`` on (see the module docstring), cut to ``tokens`` tokens."""
    if trace_path is not None:
        trace = load_trace(config_files.bundled(trace_path))
        m = trace.meta
        if (m.n_layers, m.n_experts, m.top_k) != (spec.n_moe_layers, spec.n_experts, spec.top_k):
            raise MoeError(f"--trace {trace_path} has {m.n_layers} MoE layers, {m.n_experts} experts, top-{m.top_k}; "
                           f"{spec.name} has {spec.n_moe_layers}, {spec.n_experts}, top-{spec.top_k}")
        kind, path = "given", Path(config_files.bundled(trace_path))
    else:
        found = bundled_traces()
        if spec.name in found:
            kind, path = "bundled", found[spec.name][0]
            trace = load_trace(path)
        else:
            kind, path, trace = "synthetic", _closest(spec, found), None
    if trace is not None and len(trace.sequences()) < batch:
        kind = "synthetic"
        trace = None
    if trace is None:
        trace, knobs = _synthetic(spec, path, tokens, batch, seed)
        k = ", ".join(f"{n} {v:g}" for n, v in knobs.__dict__.items())
        words = (f"synthetic: {trace.n_tokens} tokens in {len(trace.sequences())} sequences of {spec.name}'s shape, "
                 f"knobs fitted to {path.name} ({k})")
    else:
        words = f"{kind}: {path.name}"
    if trace.n_tokens > tokens:
        trace = trace.slice(0, _cut(trace, tokens, batch))
        words += f", first {trace.n_tokens} tokens"
    return TraceChoice(trace, kind, str(path), words)


def _cut(trace, tokens: int, batch: int) -> int:
    """Tokens to keep: ``tokens``, or more to the end of a sequence so that ``batch`` sequences remain."""
    seqs = trace.sequences()
    if batch <= 1 or len(seqs) < batch:
        return tokens
    return max(tokens, seqs[batch - 1][2])


def host_ram_bytes() -> int:
    """This machine's physical memory in bytes."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        raise MoeError("cannot read this machine's memory size; give --host-ram GiB") from None


def default_host_profile() -> tuple[str, str]:
    """(profile, why) for a plan given no --host-profile."""
    if LOCAL_HOST.is_file():
        return str(LOCAL_HOST), "this machine's measured profile"
    return DEFAULT_HOST_PROFILE, (f"no measured profile of this machine at {LOCAL_HOST} (moe-runtime profile "
                                  f"--device cpu --model-config MODEL --host-out {LOCAL_HOST} writes one)"
                                  f"; the bundled nominal {DEFAULT_HOST_PROFILE}")


def load_predictor_quality(path) -> dict[str, tuple[list, list]]:
    """name -> (recall per distance, precision per distance) of the router-based predictors in the file."""
    try:
        d = json.loads(Path(path).read_text())
        rec, prec = d["recall"], d["precision"]
        out = {}
        for name in ROUTER_PREDICTORS:
            if name in rec:
                r, p = list(rec[name]), list(prec[name])
                if not r or len(r) != len(p) or not all(
                        isinstance(x, (int, float)) and 0 <= x <= 1 for x in r + p):
                    raise ValueError(f"{name}: recall and precision must be lists of numbers in [0, 1]")
                out[name] = (r, p)
    except OSError as e:
        raise MoeError(f"--predictor-quality {path}: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise MoeError(f"--predictor-quality {path}: not the JSON of `moe-runtime eval-predictors --json` "
                       f"({config_files.short(str(e), 80)})") from None
    if not out:
        raise MoeError(f"--predictor-quality {path} measures none of {', '.join(ROUTER_PREDICTORS)}")
    return out


def quality_at(quality: tuple[list, list], lookahead: int) -> tuple[float, float] | None:
    """Mean recall and precision over distances 1..lookahead, or None when not measured that far."""
    r, p = quality
    if lookahead > len(r) or any(x is None for x in r[:lookahead] + p[:lookahead]):
        return None
    return sum(r[:lookahead]) / lookahead, sum(p[:lookahead]) / lookahead
