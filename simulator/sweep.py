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
    expert_source: disk              # optional: experts on storage (the devices' storage link)
    host_budget: "25%"               # optional, with disk: a host-RAM tier between storage and the device
    out: out/quickstart              # optional (default out/<name>)

Output directory: ``results.json`` (experiment fingerprint + one record per
finished point) and ``results.csv``, both rewritten atomically after every
finished point, so an interrupted sweep resumes where it stopped (finished
points are kept and skipped; a directory holding another experiment's results
is refused); ``tokens_per_s.png`` at the end (a grid: a row per trace, a column
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

A point whose budget is below the minimum is recorded with its error, not fatal; but a budget that cannot be read
or buys no expert, and a grid in which no point can run, are refused before
anything runs. ``name`` is a plain name (it names ``out/<name>``). Files are
written through ``moe_runtime.core.outputs``; temporary files left by a killed run
are removed when the sweep starts again, and a results.json that is not one
this module wrote is one error line.

This module knows nothing about how a replay works inside.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from moe_runtime.core import config_files
from moe_runtime.core.budget import parse_budget
from moe_runtime.core.config_files import check_number, short
from moe_runtime.core.errors import MoeError
from moe_runtime.core.outputs import check_output_dir, remove_stale_temps, write_json_atomic, write_text_atomic

from .bounds import BoundsCache
from .cost_model import CostModel
from .device import load_device
from .replay import Replay, ReplayOptions, build_workload, load_inputs

_OPT = {f.name: f.default for f in fields(ReplayOptions)}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SWEPT = {"budgets": "budget", "evictions": "eviction", "predictors": "predictor", "lookaheads": "lookahead",
         "scopes": "scope"}
FIXED = ("batch", "max_inflight", "prefetch_width", "recall", "precision", "seed", "expert_dtype", "expert_source",
         "host_budget")
CSV_COLUMNS = ("key", "trace", "device", "scope", "budget", "eviction", "predictor", "lookahead", "n_slots",
               "budget_fraction", "accesses", "hits", "late", "misses", "prefetch_issued", "prefetch_used",
               "prefetch_wasted", "bytes_h2d", "bytes_read", "compute_s", "stall_s", "total_s", "tokens_per_s",
               "all_resident_tokens_per_s", "best_tokens_per_s", "wall_s", "error")


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
            if parse_budget(str(b), expert_bytes=1, total_experts=1 << 62) < 1:
                raise MoeError(f"budget {short(b)} buys no experts")
        for f in ("recall", "precision"):
            check_number(f, getattr(self, f), lo=0, hi=1)
        if self.tokens is not None:
            check_number("tokens", self.tokens, lo=1, integer=True)
        check_number("seed", self.seed, lo=0, hi=2**32 - 1, integer=True)
        for f in ("batch", "max_inflight", "prefetch_width"):  # a batch of 10**9 would allocate 10**9 lanes
            if getattr(self, f) is not None:
                check_number(f, getattr(self, f), lo=1, hi=1 << 16, integer=True)
        for p in self.points():  # validates every option combination (no I/O)
            pass

    def options(self, budget, eviction, predictor, lookahead, scope) -> ReplayOptions:
        return ReplayOptions(budget=str(budget), eviction=eviction, predictor=predictor, lookahead=lookahead,
                             scope=scope, tokens=self.tokens, **{f: getattr(self, f) for f in FIXED})

    def trace_list(self) -> tuple:
        return self.traces if self.traces is not None else (self.trace,)

    def points(self) -> list[tuple[str, str, str, ReplayOptions]]:
        """(key, trace, device, options) of every grid point, "none" predictors once per lookahead list."""
        out, seen = [], set()
        for tr, dev, scope, b, ev, pred, la in itertools.product(
                self.trace_list(), self.devices, self.scopes, self.budgets, self.evictions, self.predictors,
                self.lookaheads):
            if pred == "none":
                la = self.lookaheads[0]
            key = f"{dev}|{scope}|{b}|{ev}|{pred}|{la}"
            if self.traces is not None:  # one trace keeps the keys of old results
                key = f"{Path(tr).name}|{key}"
            if key not in seen:
                seen.add(key)
                out.append((key, tr, dev, self.options(b, ev, pred, la, scope)))
        return out

    def fingerprint(self) -> str:
        """What results depend on besides the grid: a resumed sweep must match it."""
        d = {k: v for k, v in asdict(self).items() if k not in SWEPT and k not in ("devices", "out", "name")}
        for f in ("expert_dtype", "host_budget"):
            if d[f] is None:
                del d[f]  # as before it existed: old results still resume
        if d["expert_source"] == "memory":
            del d["expert_source"]
        if d["traces"] is None:
            del d["traces"]  # as before traces existed: old results still resume
        else:
            d["traces"] = sorted(d["traces"])
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def experiment_from_dict(d) -> Experiment:
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
    for k in ("budgets", "evictions", "predictors", "devices", "lookaheads", "scopes", "traces"):
        if k in d and not isinstance(d[k], tuple):
            d[k] = (d[k],)
    try:
        return Experiment(**d)
    except TypeError as e:
        raise MoeError(str(e)) from None


def load_experiment(path) -> Experiment:
    p = Path(config_files.bundled(path))  # configs/experiments/... from any working directory
    if not p.is_file():
        raise MoeError(f"experiment file not found: {path}")
    return config_files.load_yaml(p, experiment_from_dict)


# -- workers: each process loads each trace once, and reuses workloads across points ------------------
_STATE: dict = {}


def _init_worker(trace_paths, model, tokens) -> None:
    """Load every trace (``trace_paths``: resolved paths) in this process, for the points to come."""
    _STATE.clear()
    _STATE.update(model=model, tokens=tokens, inputs={}, workloads={}, devices={}, cache=BoundsCache())
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
    return Replay(trace, _STATE["devices"][trace_path, dev_name], opts, workload=w, bounds_cache=_STATE["cache"])


def _check_budgets(exp: Experiment) -> None:
    """Refuse up front a budget that buys no expert of a trace's model, and a grid in which no point can run."""
    for tr in exp.trace_list():
        trace, spec = _inputs(config_files.bundled(tr))
        for b in exp.budgets:
            if parse_budget(str(b), expert_bytes=spec.expert_bytes,
                            total_experts=trace.n_layers * trace.n_experts) < 1:
                raise MoeError(f"budget {short(b)} buys no expert of {spec.name} ({spec.expert_bytes:,} bytes each)")
    first = None
    for point in exp.points():
        try:
            _replay(point)
            return
        except MoeError as e:
            first = first or e
    raise MoeError(f"no point of the grid can run: {first}")


def _run_point(point) -> dict:
    key, trace_name, dev_name, opts = point
    row = {"key": key, "trace": trace_name, "device": dev_name, "scope": opts.scope, "budget": opts.budget,
           "eviction": opts.eviction, "predictor": opts.predictor, "lookahead": opts.lookahead}
    try:
        rep = _replay(point).run()
    except MoeError as e:
        row["error"] = str(e)
        return row
    row.update({k: rep[k] for k in CSV_COLUMNS if k in rep})
    row["all_resident_tokens_per_s"] = rep["bounds"]["all_resident_tokens_per_s"]
    row["best_tokens_per_s"] = rep["bounds"]["best_tokens_per_s"]
    row["report"] = rep
    return row


def _failed_row(point, e: BaseException) -> dict:
    """A point whose task failed outside the replay's own errors: recorded, not lost."""
    key, trace_name, dev_name, opts = point
    return {"key": key, "trace": trace_name, "device": dev_name, "scope": opts.scope, "budget": opts.budget,
            "eviction": opts.eviction, "predictor": opts.predictor, "lookahead": opts.lookahead,
            "error": f"{type(e).__name__}: {short(str(e), 300)}"}


def _save(out: Path, exp: Experiment, results: dict) -> None:
    rows = [results[k] for k in sorted(results)]
    write_json_atomic(out / "results.json", {"experiment": asdict(exp), "fingerprint": exp.fingerprint(),
                                             "results": rows})
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    wr.writeheader()
    wr.writerows(rows)
    write_text_atomic(out / "results.csv", buf.getvalue())


def _load_previous(out: Path, exp: Experiment) -> dict:
    path = out / "results.json"
    if not path.exists():
        return {}
    try:
        prev = json.loads(path.read_text())
        rows, fp = prev["results"], prev["fingerprint"]
        if not isinstance(rows, list):
            raise TypeError("'results' is not a list")
    except (ValueError, KeyError, TypeError, RecursionError, OSError) as e:  # ValueError: bad JSON or UTF-8
        raise MoeError(f"{path}: not a sweep results file ({short(str(e), 80)}); delete it or use another --out"
                       ) from None
    if fp != exp.fingerprint():
        raise MoeError(f"{out} holds results of a different experiment (trace, model, tokens or fixed options "
                       "differ); use another --out or delete it")
    for i, r in enumerate(rows):
        why = _bad_row(r)
        if why:
            raise MoeError(f"{path}: result {i} is not a sweep result ({why}); delete the file or use another "
                           "--out")
    return {r["key"]: r for r in rows}


def _bad_row(r) -> str | None:
    """Why a stored row cannot be resumed from (a tampered or foreign file), or None."""
    if not isinstance(r, dict):
        return "not a mapping"
    for k in ("key", "device", "scope", "budget", "eviction", "predictor"):
        if not isinstance(r.get(k), str):
            return f"{k} is {short(r.get(k), 40)}, not a string"
    if r.get("error") is not None:
        return None if isinstance(r["error"], str) else "error is not a string"
    for k in ("tokens_per_s", "best_tokens_per_s", "all_resident_tokens_per_s", "budget_fraction", "lookahead"):
        v = r.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return f"{k} is {short(v, 40)}, not a finite number"
    return None


def _safe_point(point) -> dict:
    try:
        return _run_point(point)
    except Exception as e:  # noqa: BLE001 - a bug in one point must not lose the others
        return _failed_row(point, e)


def run_experiment(path, out: str | None = None, workers: int | None = None, backend: str = "local",
                   address: str | None = None) -> int:
    from tqdm import tqdm

    from .plots import plot_sweep

    exp = load_experiment(path)
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
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
    out_dir = check_output_dir(out or exp.out or f"out/{exp.name}", "sweep output directory",
                               inputs=[path, *trace_paths])
    removed = remove_stale_temps(out_dir)  # left by a run killed while writing
    if removed:
        print(f"removed {removed} temporary file(s) left in {out_dir} by an interrupted run")
    points = exp.points()
    results = _load_previous(out_dir, exp)
    todo = [p for p in points if p[0] not in results]
    if results:
        print(f"resuming: {len(points) - len(todo)} of {len(points)} points already done in {out_dir}, "
              f"skipping them")
    where = f"Ray ({address or 'local instance'})" if backend == "ray" else f"{workers} worker(s)"
    print(f"{exp.name}: {len(todo)} points to run on {where}, trace{'s' if exp.traces else ''} "
          f"{', '.join(exp.trace_list())}" + (f" (first {exp.tokens} tokens)" if exp.tokens else ""))
    bar = tqdm(total=len(todo), unit="point", dynamic_ncols=True)
    try:
        if backend == "ray" and todo:
            from .ray_backend import ray_rows
            rows = ray_rows(todo, exp, workers, address)
        elif workers == 1 or len(todo) <= 1:
            rows = map(_safe_point, todo)
        else:
            pool = multiprocessing.get_context("fork").Pool(
                workers, initializer=_init_worker, initargs=(trace_paths, exp.model, exp.tokens))
            rows = pool.imap_unordered(_safe_point, todo)
        for row in rows:
            results[row["key"]] = row
            _save(out_dir, exp, results)
            bar.update()
    except KeyboardInterrupt:
        bar.close()
        print(f"interrupted: {len(results)} of {len(points)} points saved in {out_dir}; "
              "run the same command again to resume")
        raise
    finally:
        bar.close()
        if backend == "local" and workers > 1 and len(todo) > 1:
            pool.terminate()
    rows = [results[k] for k in sorted(results)]
    errors = [r for r in rows if r.get("error")]
    png = plot_sweep([r for r in rows if not r.get("error")], out_dir / "tokens_per_s.png", title=exp.name)
    print(summary(rows))
    for r in errors[:5]:
        print(f"  skipped {r['key']}: {r['error']}")
    print(f"wrote {out_dir / 'results.csv'}, {out_dir / 'results.json'}" + (f", {png}" if png else ""))
    return 0


def summary(rows: list[dict]) -> str:
    """Per (trace, device, scope, budget): the fastest configuration, beside the bounds."""
    best: dict = {}
    for r in rows:
        if r.get("error"):
            continue
        k = (Path(r.get("trace") or "").name, r["device"], r["scope"], r["budget"])
        if k not in best or r["tokens_per_s"] > best[k]["tokens_per_s"]:
            best[k] = r
    lines = []
    for tr in sorted({k[0] for k in best}):
        if tr:
            lines.append(f"trace {tr}")
        lines.append(f"{'device':<16} {'scope':<9} {'budget':>7} {'tok/s':>8} {'best':>8} {'resident':>8}  fastest")
        for k in sorted((k for k in best if k[0] == tr), key=lambda k: (k[1], k[2], best[k]["budget_fraction"])):
            r = best[k]
            how = f"{r['eviction']} + {r['predictor']}" + (f" (lookahead {r['lookahead']})"
                                                           if r["predictor"] != "none" else "")
            lines.append(f"{k[1]:<16} {k[2]:<9} {k[3]:>7} {r['tokens_per_s']:>8.2f} {r['best_tokens_per_s']:>8.2f} "
                         f"{r['all_resident_tokens_per_s']:>8.2f}  {how}")
    return "\n".join(lines)
