"""A sweep point's row, computed in a worker (a pool process, a Ray task or the sweep's own process).

Contract: ``use_inputs(model, tokens)`` makes this process's state serve
points of that model and token count (each trace loaded once per process,
workloads and devices reused across points); ``run_point(point)`` returns the
point's row, its failure recorded in the row (``failed_row``), never raised;
``row_matches(row, point)`` says whether a stored row is that point's result
(a resumed sweep runs a point again when not). ``check_budgets(exp)`` refuses,
before anything runs, a budget that buys no expert, one that does not fit a
device, and a grid in which no point can run.

This module knows nothing about how points are scheduled or stored.
"""

from __future__ import annotations

import signal

from moe_runtime.core import config_files
from moe_runtime.core.budget import is_fit, parse_budget
from moe_runtime.core.config_files import short
from moe_runtime.core.errors import MoeError
from moe_runtime.core.memory import DoesNotFit

from .bounds import BoundsCache
from .cost_model import CostModel
from .device import load_device
from .experiment import Experiment
from .replay import Replay, build_workload, load_inputs
from .sweep_store import CSV_COLUMNS

# -- workers: each process loads each trace once, and reuses workloads across points ------------------
_STATE: dict = {}


def use_inputs(model, tokens) -> None:
    """Make this process's worker state serve points of (``model``, ``tokens``), keeping what it has loaded when
    they are the same (a Ray worker calls it before each point)."""
    if _STATE.get("model", 0) != model or _STATE.get("tokens", 0) != tokens:
        _STATE.clear()
        _STATE.update(model=model, tokens=tokens, inputs={}, workloads={}, devices={}, cache=BoundsCache())


def init_worker(trace_paths, model, tokens, pool_worker: bool = False) -> None:
    """Load every trace (``trace_paths``: resolved paths) in this process, for the points to come."""
    if pool_worker:  # Ctrl-C reaches the whole process group: the parent alone reports it
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _STATE.clear()
    use_inputs(model, tokens)
    for t in trace_paths:
        _inputs(t)


def _inputs(trace_path):
    """(trace, spec) of a trace, loaded once per process (a Ray worker loads it at its first point)."""
    if trace_path not in _STATE["inputs"]:
        _STATE["inputs"][trace_path] = load_inputs(trace_path, _STATE["model"], _STATE["tokens"])
    return _STATE["inputs"][trace_path]


def _replay(point) -> Replay:
    """The point's Replay, built (which checks its budget) but not run; reuses devices and workloads."""
    key, trace_name, dev_name, opts = point
    trace_path = config_files.bundled(trace_name)
    trace, spec = _inputs(trace_path)
    if (trace_path, dev_name) not in _STATE["devices"]:
        _STATE["devices"][trace_path, dev_name] = CostModel(spec, load_device(
            config_files.bundled(dev_name) if "/" in dev_name else dev_name))
    wk = (trace_path, opts.batch)
    w = _STATE["workloads"].get(wk) or _STATE["workloads"].setdefault(wk, build_workload(trace, opts.batch))
    return Replay(trace, _STATE["devices"][trace_path, dev_name], opts, workload=w, bounds_cache=_STATE["cache"],
                  fit_check=True)


def check_budgets(exp: Experiment) -> None:
    """Refuse up front a budget that buys no expert of a trace's model, and a grid in which no point can run."""
    for tr in exp.trace_list():
        trace, spec = _inputs(config_files.bundled(tr))
        for b in exp.budgets:
            if is_fit(b):
                continue  # what it buys depends on the device: the points' own check below
            if parse_budget(str(b), expert_bytes=spec.expert_bytes,
                            total_experts=trace.n_layers * trace.n_experts) < 1:
                raise MoeError(f"budget {short(b)} buys no expert of {spec.name} ({spec.expert_bytes:,} bytes each)")
    first, runs = None, False
    for point in exp.points():  # every point: a budget that does not fit refuses the whole sweep
        try:
            _replay(point)
            runs = True
        except DoesNotFit as e:
            raise MoeError(f"{point[0]}: {e}") from None
        except MoeError as e:
            first = first or e
    if not runs:
        raise MoeError(f"no point of the grid can run: {first}")


def _run_point(point) -> dict:
    key, trace_name, dev_name, opts = point
    row = {"key": key, "trace": trace_name, "device": dev_name, "scope": opts.scope, "budget": opts.budget,
           "eviction": opts.eviction, "predictor": opts.predictor, "lookahead": opts.lookahead,
           "miss_policy": opts.miss_policy, "host_profile": opts.host_profile, "n_host_layers": opts.n_host_layers}
    try:
        rep = _replay(point).run()
    except MoeError as e:
        row["error"] = str(e)
        return row
    row.update({k: rep[k] for k in CSV_COLUMNS if k in rep})
    row["all_resident_tokens_per_s"] = rep["bounds"]["all_resident_tokens_per_s"]
    row["best_tokens_per_s"] = rep["bounds"]["best_tokens_per_s"]
    row["best_hybrid_tokens_per_s"] = rep["bounds"].get("best_hybrid_tokens_per_s")
    row["host_profile"] = rep["host_profile"]
    row["report"] = rep
    return row


def row_matches(row: dict, point) -> bool:
    """Whether a stored row is the result of ``point`` (its options, as ``_run_point`` writes them)."""
    key, trace_name, dev_name, opts = point
    want = {"trace": trace_name, "device": dev_name, "scope": opts.scope, "budget": opts.budget,
            "eviction": opts.eviction, "predictor": opts.predictor, "lookahead": opts.lookahead}
    if row.get("error") is None:
        want.update(miss_policy=opts.miss_policy, n_host_layers=opts.n_host_layers)
    # rows from before an axis existed lack it: what a row holds must match, what it lacks is the default
    return all(row[k] == v for k, v in want.items() if k in row and not (k == "trace" and row[k] is None))


def failed_row(point, e: BaseException) -> dict:
    """A point whose task failed outside the replay's own errors: recorded, not lost."""
    key, trace_name, dev_name, opts = point
    return {"key": key, "trace": trace_name, "device": dev_name, "scope": opts.scope, "budget": opts.budget,
            "eviction": opts.eviction, "predictor": opts.predictor, "lookahead": opts.lookahead,
            "error": f"{type(e).__name__}: {short(str(e), 300)}"}


def run_point(point) -> dict:
    """A point's row, its failure recorded in the row (never raised): what every backend runs."""
    try:
        return _run_point(point)
    except Exception as e:  # noqa: BLE001 - a bug in one point must not lose the others
        return failed_row(point, e)


def trace_bytes(trace_paths) -> int:
    """Memory one worker holds for its traces (their arrays, and about as much again for workloads)."""
    total = 0
    for t in trace_paths:
        trace = _STATE["inputs"][t][0]
        total += sum(a.nbytes for a in (trace.expert_ids, trace.weights, trace.seq_id, trace.position, trace.phase))
        total += sum(a.nbytes for a in trace.predictions.values())
    return 2 * total
