"""`moe-sim sweep`: replay one trace over a grid of budgets x policies x predictors x lookaheads x devices x scopes.

The grid is an ``experiment.Experiment`` (its YAML schema is there); a point's
row is computed by ``sweep_points.run_point``; the output folder is a
``sweep_store.SweepStore``. This module runs the grid: checks, estimate,
workers, progress, summary.

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
runs. Files are written through ``moe_runtime.core.outputs``; temporary files left by a killed run
are removed when the sweep starts again, and a results.json that is not one
this module wrote is one error line.

This module knows nothing about how a replay works inside.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import asdict
from pathlib import Path

from moe_runtime.core import config_files
from moe_runtime.core.config_files import short
from moe_runtime.core.errors import MoeError
from moe_runtime.core.outputs import check_output_dir
from moe_runtime.core.resources import check_fits

from .device import load_device
from .experiment import MAX_POINTS, Experiment, experiment_from_dict, load_experiment  # noqa: F401 (the API)
from .sweep_points import check_budgets, init_worker, row_matches, run_point, trace_bytes
from .sweep_store import SweepStore


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} hours"


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
    init_worker(trace_paths, exp.model, exp.tokens)  # fails early, in this process, on bad inputs
    for d in exp.devices:
        load_device(config_files.bundled(d) if "/" in d else d)
    check_budgets(exp)
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
        check_fits(f"{workers} sweep worker(s) holding the traces", workers * trace_bytes(trace_paths))
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
    done_first = int(first_s is not None)  # the bar counts the point run for the estimate too
    bar = tqdm(total=len(todo) + done_first, initial=done_first, unit="point", dynamic_ncols=True)
    pool = None
    try:
        if backend == "ray" and todo:
            from .ray_backend import ray_rows
            rows = ray_rows(todo, exp, workers, address)
        elif workers == 1 or len(todo) <= 1:
            rows = map(run_point, todo)
        else:
            pool = multiprocessing.get_context("fork").Pool(
                workers, initializer=init_worker, initargs=(trace_paths, exp.model, exp.tokens, True))
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
