"""`moe-sim sweep`: replay one trace over a grid of budgets x policies x predictors x lookaheads x devices x scopes.

Experiment YAML (frozen ``Experiment``; lists are swept, scalars fixed)::

    name: quickstart                 # required
    trace: traces/deepseek-v2-lite-law.npz   # one trace; relative paths: to the cwd, else the repo root
    traces: [traces/a.npz, traces/b.npz]     # or several (exactly one of trace, traces)
    model: deepseek-v2-lite          # optional (default: the trace's meta.model)
    tokens: 1000                     # optional: first N tokens
    budgets: ["10%", "50%", 2GiB, 48]
    evictions: [lru, belady]
    predictors: [none, history]      # "none" is run once, not once per lookahead
    lookaheads: [1, 2]               # default [ReplayOptions.lookahead]
    devices: [rtx-4060-8gb]          # names or YAML files
    scopes: [global]                 # default [ReplayOptions.scope]
    batch, max_inflight, prefetch_width, recall, precision, seed: scalars, defaults from ReplayOptions
    miss_policies: [copy, auto]      # optional axis: copy | host | auto (default [auto]; docs/hybrid.md)
    host_profiles: [ddr5-desktop]    # optional axis: hosts (names in configs/hosts or YAML files)
    n_host_layers: [0, 4]            # optional axis: the first N MoE layers computed on the host
    host_layers: "0,5"               # optional: MoE layers always on the host (scalar)
    context: 4096                    # optional: positions per sequence the KV cache is sized for
    workspace: 512MiB                # optional: device memory kept for workspace
    expert_source: disk              # optional: experts on storage (the devices' storage link)
    host_budget: "25%"               # optional, with disk: a host-RAM tier between storage and the device
    out: out/quickstart              # optional (default out/<name>)

Output directory (``sweep_store.SweepStore``): locked while the sweep runs (a
second sweep into it is refused); each finished point is one line appended to
``results.jsonl``, and ``results.json`` (experiment fingerprint + one record
per point) and ``results.csv`` are written at the end and on resume, so a
point costs the same at the 5,000th as at the 100th and an interrupted sweep
resumes where it stopped (finished points are validated, kept and skipped; a
row that is not the point its key names runs again; a
directory holding another experiment's results is refused);
``tokens_per_s.png`` at the end (a grid: a row per trace, a column
per predictor, ``none`` first). With ``traces`` a point's key starts with the
trace's file name and the summary groups by trace; with ``trace`` keys are as
they always were, so old results resume.

Backends (``--backend``): ``local`` (default) runs points in a process pool on
this machine; ``ray`` runs each point as a Ray task, on a local Ray instance or
on the cluster at ``--address``. Both write the same files as points finish; a
point that fails (an error in its task, a worker lost) is recorded with its
error. Ray workers load traces by path and the code by import: the project must
be installed on every node (or shipped in a Ray runtime environment), and the
trace paths must resolve there (``ray_backend.py``). The Belady bound of each
(trace, budget, scope) is computed once and kept under ``out/cache/bounds``
(``bounds.BoundsCache``).

Before it starts, a sweep prints the grid's size and an estimate of its time (the
first point, timed); a grid above ``MAX_POINTS`` points is refused unless
``--max-points`` raises the limit; workers are capped at the points to run and
the CPUs. Ctrl-C ends it with one line (pool workers ignore SIGINT) and exit 130.

A point whose budget is below the minimum is recorded with its error, not fatal; but a budget that cannot be read
or buys no expert, a budget that does not fit in a device's memory beside the
dense weights, KV cache and workspace (``core/memory.py``; one line with the
numbers), and a grid in which no point can run, are refused before anything
runs. The hybrid axes add ``|policy``, ``|host`` and ``|hN`` to a point's key
only when the experiment names them, so old keys keep their form. ``name`` is a plain name (it names ``out/<name>``). Files are
written through ``moe_runtime.core.outputs``; temporary files left by a killed run
are removed when the sweep starts again, and a results.json that is not one
this module wrote is one error line.

This module knows nothing about how a replay works inside.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
import signal
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from moe_runtime.core import config_files
from moe_runtime.core.budget import is_fit, parse_budget
from moe_runtime.core.config_files import check_number, short
from moe_runtime.core.errors import MoeError
from moe_runtime.core.memory import DoesNotFit
from moe_runtime.core.options import DEFAULT_MISS_POLICY
from moe_runtime.core.outputs import check_output_dir
from moe_runtime.core.resources import check_fits

from .bounds import BoundsCache
from .cost_model import CostModel
from .device import load_device
from .replay import Replay, ReplayOptions, build_workload, load_inputs
from .sweep_store import CSV_COLUMNS, SweepStore

_OPT = {f.name: f.default for f in fields(ReplayOptions)}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SWEPT = {"budgets": "budget", "evictions": "eviction", "predictors": "predictor", "lookaheads": "lookahead",
         "scopes": "scope"}
FIXED = ("batch", "max_inflight", "prefetch_width", "recall", "precision", "seed", "expert_dtype", "expert_source",
         "host_budget", "host_layers", "context", "workspace")
HYBRID_AXES = {"miss_policies": "miss_policy", "host_profiles": "host_profile", "n_host_layers": "n_host_layers"}
MAX_POINTS = 100_000  # a larger grid is refused unless --max-points raises it (871,200 points: 406 hours)


@dataclass(frozen=True)
class Experiment:
    name: str
    trace: str | None
    budgets: tuple
    evictions: tuple
    predictors: tuple
    devices: tuple
    lookaheads: tuple = (_OPT["lookahead"],)
    scopes: tuple = (_OPT["scope"],)
    model: str | None = None
    tokens: int | None = None
    batch: int = _OPT["batch"]
    max_inflight: int = _OPT["max_inflight"]
    prefetch_width: int | None = _OPT["prefetch_width"]
    recall: float = _OPT["recall"]
    precision: float = _OPT["precision"]
    seed: int = _OPT["seed"]
    expert_dtype: str | None = _OPT["expert_dtype"]  # overrides the model's (int4, mxfp4, ...)
    expert_source: str = _OPT["expert_source"]  # memory | disk (the devices' storage link)
    host_budget: str | None = _OPT["host_budget"]  # a host tier above the disk (three tiers)
    host_layers: str | None = _OPT["host_layers"]
    context: int = _OPT["context"]
    workspace: str = _OPT["workspace"]
    miss_policies: tuple | None = None  # None: [auto], and keys without the axis
    host_profiles: tuple | None = None  # None: the default host, and keys without the axis
    n_host_layers: tuple | None = None  # None: [0], and keys without the axis
    out: str | None = None
    traces: tuple | None = None

    def __post_init__(self) -> None:
        if (self.trace is None) == (self.traces is None):
            raise MoeError("give exactly one of trace (one file) and traces (a list of files)")
        if self.traces is not None:
            if not isinstance(self.traces, tuple) or not self.traces or not all(
                    isinstance(t, str) and t for t in self.traces):
                raise MoeError("traces must be a non-empty list of file names")
            if len({Path(t).name for t in self.traces}) != len(self.traces):
                raise MoeError("traces must have distinct file names (they name the results' rows)")
        for f in ("name",) + (("trace",) if self.traces is None else ()):
            if not isinstance(getattr(self, f), str) or not getattr(self, f):
                raise MoeError(f"{f} must be a non-empty string")
        if not _NAME.fullmatch(self.name):  # it names the folder out/<name>: no way out of out/
            raise MoeError(f"name must be a plain name (letters, digits, '.', '_', '-', starting with a letter "
                           f"or digit), got {short(self.name)}")
        if self.out is not None and (not isinstance(self.out, str) or not self.out):
            raise MoeError(f"out must be a non-empty string, got {short(self.out)}")
        for f in ("budgets", "evictions", "predictors", "devices", "lookaheads", "scopes"):
            v = getattr(self, f)
            if not isinstance(v, tuple) or not v:
                raise MoeError(f"{f} must be a non-empty list")
            for x in v:  # a list or mapping inside would reach the options as something else
                if f == "lookaheads":
                    check_number("lookahead", x, lo=1, integer=True)
                elif not isinstance(x, str) and not (f == "budgets" and isinstance(x, int)
                                                     and not isinstance(x, bool)):
                    raise MoeError(f"{f} must hold {'budgets' if f == 'budgets' else 'names'}, got {short(x)}")
        for b in self.budgets:  # syntax and "buys nothing", before anything runs; the model's sizes later
            if parse_budget(str(b), expert_bytes=1, total_experts=1 << 62, free_bytes=1 << 62) < 1:
                raise MoeError(f"budget {short(b)} buys no experts")
        for f in ("recall", "precision"):
            check_number(f, getattr(self, f), lo=0, hi=1)
        if self.tokens is not None:
            check_number("tokens", self.tokens, lo=1, integer=True)
        check_number("seed", self.seed, lo=0, hi=2**32 - 1, integer=True)
        for f in ("batch", "max_inflight", "prefetch_width"):  # a batch of 10**9 would allocate 10**9 lanes
            if getattr(self, f) is not None:
                check_number(f, getattr(self, f), lo=1, hi=1 << 16, integer=True)
        for f in HYBRID_AXES:
            v = getattr(self, f)
            if v is not None and (not isinstance(v, tuple) or not v):
                raise MoeError(f"{f} must be a non-empty list")
            for x in v or ():
                if f == "n_host_layers":
                    check_number("n_host_layers", x, lo=0, hi=4096, integer=True)
                elif not isinstance(x, str) or not x:
                    raise MoeError(f"{f} must hold names, got {short(x)}")

    def size(self) -> int:
        """The grid's points, counted without building them ("none" once per lookahead list)."""
        none = sum(1 for p in self.predictors if p == "none")
        return (len(self.trace_list()) * len(self.devices) * len(self.scopes) * len(set(map(str, self.budgets)))
                * len(self.evictions) * (none + (len(self.predictors) - none) * len(self.lookaheads))
                * math.prod(len(getattr(self, f) or (None,)) for f in HYBRID_AXES))

    def check_size(self, max_points: int = MAX_POINTS) -> None:
        n = self.size()
        if n > max_points:
            raise MoeError(f"the grid has {n:,} points, above the limit of {max_points:,}; narrow it, or raise the "
                           "limit with --max-points")
        for p in self.points():  # validates every option combination (no I/O)
            pass

    def axis(self, f: str) -> tuple:
        """A hybrid axis's values (its default alone when the experiment does not name it)."""
        v = getattr(self, f)
        if v is not None:
            return v
        return {"miss_policies": (DEFAULT_MISS_POLICY["command"],), "host_profiles": (None,),
                "n_host_layers": (0,)}[f]

    def options(self, budget, eviction, predictor, lookahead, scope, miss_policy=DEFAULT_MISS_POLICY["command"],
                host_profile=None, n_host_layers=0) -> ReplayOptions:
        return ReplayOptions(budget=str(budget), eviction=eviction, predictor=predictor, lookahead=lookahead,
                             scope=scope, tokens=self.tokens, miss_policy=miss_policy, host_profile=host_profile,
                             n_host_layers=n_host_layers, **{f: getattr(self, f) for f in FIXED})

    def trace_list(self) -> tuple:
        return self.traces if self.traces is not None else (self.trace,)

    def points(self) -> list[tuple[str, str, str, ReplayOptions]]:
        """(key, trace, device, options) of every grid point, "none" predictors once per lookahead list."""
        out, seen = [], set()
        for tr, dev, scope, b, ev, pred, la, mp, host, nh in itertools.product(
                self.trace_list(), self.devices, self.scopes, self.budgets, self.evictions, self.predictors,
                self.lookaheads, *(self.axis(f) for f in HYBRID_AXES)):
            if pred == "none":
                la = self.lookaheads[0]
            key = f"{dev}|{scope}|{b}|{ev}|{pred}|{la}"
            if self.traces is not None:  # one trace keeps the keys of old results
                key = f"{Path(tr).name}|{key}"
            for f, v in zip(HYBRID_AXES, (mp, host, f"h{nh}")):
                if getattr(self, f) is not None:
                    key += f"|{v}"
            if key not in seen:
                seen.add(key)
                out.append((key, tr, dev, self.options(b, ev, pred, la, scope, mp, host, nh)))
        return out

    def fingerprint(self) -> str:
        """What results depend on besides the grid: a resumed sweep must match it."""
        d = {k: v for k, v in asdict(self).items() if k not in SWEPT and k not in ("devices", "out", "name")
             and k not in HYBRID_AXES}
        d["semantics"] = "hybrid"  # results from before a miss could be computed on the host are not resumed
        for f in ("expert_dtype", "host_budget", "host_layers"):
            if d[f] is None:
                del d[f]  # as before it existed: old results still resume
        if d["expert_source"] == "memory":
            del d["expert_source"]
        if d["traces"] is None:
            del d["traces"]  # as before traces existed: old results still resume
        else:
            d["traces"] = sorted(d["traces"])
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def experiment_from_dict(d, max_points: int = MAX_POINTS) -> Experiment:
    if not isinstance(d, dict):
        raise MoeError("experiment must be a mapping of field: value")
    names = {f.name for f in fields(Experiment)}
    unknown = sorted(set(map(str, d)) - names)
    if unknown:
        raise MoeError(f"unknown field(s): {config_files.names(unknown)}")
    missing = [f for f in ("name", "budgets", "evictions", "predictors", "devices") if f not in d]
    if "trace" not in d and "traces" not in d:
        missing.insert(1, "trace")
    if missing:
        raise MoeError(f"missing field(s): {', '.join(missing)}")
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    d.setdefault("trace", None)
    for k in ("budgets", "evictions", "predictors", "devices", "lookaheads", "scopes", "traces", *HYBRID_AXES):
        if k in d and not isinstance(d[k], tuple):
            d[k] = (d[k],)
    try:
        exp = Experiment(**d)
    except TypeError as e:
        raise MoeError(str(e)) from None
    exp.check_size(max_points)
    return exp


def load_experiment(path, max_points: int = MAX_POINTS) -> Experiment:
    p = Path(config_files.bundled(path))  # configs/experiments/... from any working directory
    if not p.is_file():
        raise MoeError(f"experiment file not found: {path}")
    return config_files.load_yaml(p, lambda d: experiment_from_dict(d, max_points))


# -- workers: each process loads each trace once, and reuses workloads across points ------------------
_STATE: dict = {}


def use_inputs(model, tokens) -> None:
    """Make this process's worker state serve points of (``model``, ``tokens``), keeping what it has loaded when
    they are the same (a Ray worker calls it before each point)."""
    if _STATE.get("model", 0) != model or _STATE.get("tokens", 0) != tokens:
        _STATE.clear()
        _STATE.update(model=model, tokens=tokens, inputs={}, workloads={}, devices={}, cache=BoundsCache())


def _init_worker(trace_paths, model, tokens, pool_worker: bool = False) -> None:
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


def _check_budgets(exp: Experiment) -> None:
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


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} hours"


def _trace_bytes(trace_paths) -> int:
    """Memory one worker holds for its traces (their arrays, and about as much again for workloads)."""
    total = 0
    for t in trace_paths:
        trace = _STATE["inputs"][t][0]
        total += sum(a.nbytes for a in (trace.expert_ids, trace.weights, trace.seq_id, trace.position, trace.phase))
        total += sum(a.nbytes for a in trace.predictions.values())
    return 2 * total


def run_experiment(path, out: str | None = None, workers: int | None = None, backend: str = "local",
                   address: str | None = None, max_points: int = MAX_POINTS) -> int:
    from tqdm import tqdm

    from .plots import plot_sweep

    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 1:
        raise MoeError(f"--max-points must be >= 1, got {max_points}")
    exp = load_experiment(path, max_points)
    if workers is None:
        workers = min(2, _cpus())
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise MoeError(f"--workers must be >= 1, got {workers}")
    if backend not in ("local", "ray"):
        raise MoeError(f"--backend must be local or ray, got {short(backend)}")
    if address and backend != "ray":
        raise MoeError("--address is for --backend ray")
    trace_paths = [config_files.bundled(t) for t in exp.trace_list()]
    _init_worker(trace_paths, exp.model, exp.tokens)  # fails early, in this process, on bad inputs
    for d in exp.devices:
        load_device(config_files.bundled(d) if "/" in d else d)
    _check_budgets(exp)
    if backend == "ray" and address:  # a dead address is one line within a stated time, before any work
        from .ray_backend import check_address
        check_address(address)
    out_dir = check_output_dir(out or exp.out or f"out/{exp.name}", "sweep output directory",
                               inputs=[path, *trace_paths])
    store = SweepStore(out_dir, asdict(exp), exp.fingerprint())
    results = store.open()  # locks the folder until this sweep ends
    try:
        return _run(exp, store, results, trace_paths, workers, backend, address, tqdm, plot_sweep)
    finally:
        store.close()


def _run(exp, store, results, trace_paths, workers, backend, address, tqdm, plot_sweep) -> int:
    out_dir = store.out
    if store.removed_temps:
        print(f"removed {store.removed_temps} temporary file(s) left in {out_dir} by an interrupted run")
    points = exp.points()
    stale = [p[0] for p in points if p[0] in results and not row_matches(results[p[0]], p)]
    for key in stale:  # a stored row that is not its key's point (edited, or another grid's): run it again
        del results[key]
    if stale:
        print(f"{len(stale)} stored result(s) in {out_dir} do not match their grid point (first: {stale[0]}); "
              "running them again")
    todo = [p for p in points if p[0] not in results]
    if results:
        print(f"resuming: {len(points) - len(todo)} of {len(points)} points already done in {out_dir}, "
              f"skipping them")
    if backend == "local":
        capped = max(1, min(workers, len(todo), _cpus()))
        if capped < workers:
            print(f"--workers {workers}: using {capped} ({len(todo)} points to run, {_cpus()} CPUs)")
        workers = capped
        check_fits(f"{workers} sweep worker(s) holding the traces", workers * _trace_bytes(trace_paths))
    first_s = None
    if todo:  # the first point, timed here, gives the estimate (and its row)
        t0 = time.perf_counter()
        row = run_point(todo[0])
        first_s = time.perf_counter() - t0
        results[row["key"]] = row
        store.record(row)
        todo = todo[1:]
    where = f"Ray ({address or 'local instance'})" if backend == "ray" else f"{workers} worker(s)"
    eta = f", about {_duration(first_s * len(todo) / max(1, workers))} (first point {first_s:.2f} s)" \
        if first_s is not None else ""
    print(f"{exp.name}: grid of {len(points):,} points, {len(todo) + (first_s is not None)} points to run on "
          f"{where}{eta}; "
          f"trace{'s' if exp.traces else ''} {', '.join(exp.trace_list())}"
          + (f" (first {exp.tokens} tokens)" if exp.tokens else ""))
    bar = tqdm(total=len(todo), unit="point", dynamic_ncols=True)
    pool = None
    try:
        if backend == "ray" and todo:
            from .ray_backend import ray_rows
            rows = ray_rows(todo, exp, workers, address)
        elif workers == 1 or len(todo) <= 1:
            rows = map(run_point, todo)
        else:
            pool = multiprocessing.get_context("fork").Pool(
                workers, initializer=_init_worker, initargs=(trace_paths, exp.model, exp.tokens, True))
            rows = pool.imap_unordered(run_point, todo)
        for row in rows:
            results[row["key"]] = row
            store.record(row)
            bar.update()
    except KeyboardInterrupt:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool = None
        raise KeyboardInterrupt(f"{len(results)} of {len(points)} points saved in {out_dir}; run the same command "
                                "again to resume") from None
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    store.finish(results)
    rows = [results[k] for k in sorted(results)]
    errors = [r for r in rows if r.get("error")]
    png = plot_sweep([r for r in rows if not r.get("error")], out_dir / "tokens_per_s.png", title=exp.name)
    print(summary(rows))
    for r in errors[:5]:
        print(f"  skipped {r['key']}: {r['error']}")
    print(f"wrote {out_dir / 'results.csv'}, {out_dir / 'results.json'}" + (f", {png}" if png else ""))
    return 0

def summary(rows: list[dict]) -> str:
    """Per (trace, device, scope, budget), and miss policy when several ran: the fastest configuration, beside
    the bounds (copy-only and hybrid)."""
    best: dict = {}
    policies = len({r.get("miss_policy") for r in rows if not r.get("error")}) > 1  # a row per policy then
    for r in rows:
        if r.get("error"):
            continue
        k = (Path(r.get("trace") or "").name, r["device"], r["scope"], r["budget"]) + (
            (r.get("miss_policy"),) if policies else ())
        if k not in best or r["tokens_per_s"] > best[k]["tokens_per_s"]:
            best[k] = r
    lines = []
    for tr in sorted({k[0] for k in best}):
        if tr:
            lines.append(f"trace {tr}")
        lines.append(f"{'device':<16} {'scope':<9} {'budget':>7} {'tok/s':>8} {'best,copy':>9} {'best,hyb':>8} "
                     f"{'resident':>8}  fastest")
        for k in sorted((k for k in best if k[0] == tr), key=lambda k: (k[1], k[2], best[k]["budget_fraction"],
                                                                          k[4:])):
            r = best[k]
            how = f"{r['eviction']} + {r['predictor']}" + (f" (lookahead {r['lookahead']})"
                                                           if r["predictor"] != "none" else "")
            if r.get("miss_policy"):
                how = f"miss {r['miss_policy']}" + (f", {r['n_host_layers']} host layers" if r.get("n_host_layers")
                                                    else "") + f": {how}"
            hb = r.get("best_hybrid_tokens_per_s")
            lines.append(f"{k[1]:<16} {k[2]:<9} {k[3]:>7} {r['tokens_per_s']:>8.2f} {r['best_tokens_per_s']:>9.2f} "
                         f"{hb if hb is not None else float('nan'):>8.2f} {r['all_resident_tokens_per_s']:>8.2f}  {how}")
    return "\n".join(lines)
