"""How fast the simulator replays: expert accesses per second of wall time, on the bundled law trace.

    python3 benchmarks/simulator.py [--tokens 2000] [--device rtx-4060-8gb] [--quick]
    python3 benchmarks/simulator.py --json      # the issue's figures as one JSON object
    python3 benchmarks/simulator.py --sweep     # a sweep's cost per point at point 100 and 5,000

``--json`` prints ``accesses_per_s`` (``none``, ``history``, ``oracle``: LRU,
budget 25%, lookahead 2, analytic copy engines), their ratios to ``none``,
``replay_s`` and ``bounds_s`` (the no-prefetch replay, and the Belady count of
the same trace, budget and scope), and ``startup_ratio``: a whole ``moe-sim
replay`` process (imports, trace loading, bounds with a cold cache, JSON out)
over the in-process ``Replay.run()`` of the same replay with its bounds (memo
cleared), on the whole law trace. Every figure is the best of ``--repeats``
rounds, the configurations interleaved within a round (a shared machine is
noisy); the load average is printed beside them.

Prints (1) accesses/s with LRU and no prefetch, and with history prefetch,
against the target of 300,000 accesses/s on one core without prefetch; (2) how
replay time grows with trace length (1k, 2k, 4k, 8k tokens: time and time per
token, which should stay flat if time is linear); (3) how it varies with the
budget; and with ``--sweep``, (4) a 5,000-point sweep of two-token points
(``moe-sim sweep``'s own code, one worker): the wall time per finished point
and the time its recording takes, averaged over the 50 points around point 100
and point 5,000 (budgets of 10**9 + i bytes: the same slots at every point); a sweep that records in O(1) per point keeps them within 2x.
Times are the replay itself (simpy run, cache, predictor), measured
with time.perf_counter in this one process; the bounds pass is timed apart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# this file is named like the package it measures: keep its own folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from simulator import bounds as B  # noqa: E402
from simulator.cost_model import CostModel
from simulator.device import load_device
from simulator.replay import Replay, ReplayOptions, build_workload, load_inputs

REPO = Path(__file__).resolve().parent.parent
TARGET = 300_000


def replay(trace, cost, repeats: int = 1, **kw) -> dict:
    """Best of ``repeats`` runs (least disturbed by other processes)."""
    w = build_workload(trace, kw.get("batch", 1))
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        rep = Replay(trace, cost, ReplayOptions(**kw), workload=w).run()
        rep["with_bounds_s"] = time.perf_counter() - t0
        if best is None or rep["wall_s"] < best["wall_s"]:
            best = rep
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2000, help="trace length for sections 1 and 3")
    ap.add_argument("--device", default="rtx-4060-8gb")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="shorter traces (for a smoke run)")
    ap.add_argument("--json", action="store_true", help="print the issue's figures as one JSON object")
    ap.add_argument("--sweep", action="store_true", help="only section 4: a sweep's cost per point")
    ap.add_argument("--sweep-points", type=int, default=5000, help="points of the section 4 sweep")
    args = ap.parse_args()
    if args.sweep:
        r = sweep_cost(args.sweep_points)
        print(json.dumps(r, indent=1) if args.json else
              f"4. sweep of {r['points']:,} two-token points, one worker\n"
              f"{'at point':>9} {'wall ms/point':>14} {'record us/point':>16}\n" + "\n".join(
                  f"{k:>9,} {v['wall_ms']:>14.2f} {v['record_us']:>16.1f}" for k, v in r["at"].items())
              + f"\nratio (last/first): wall {r['wall_ratio']:.2f}x, record {r['record_ratio']:.2f}x")
        return
    if args.json:
        print(json.dumps(figures(args), indent=1))
        return
    full, spec = load_inputs(REPO / "traces/deepseek-v2-lite-law.npz")
    cost = CostModel(spec, load_device(args.device))
    n = 500 if args.quick else args.tokens
    trace = full.slice(0, min(n, full.n_tokens))
    print(f"law trace, {trace.n_tokens} tokens x {trace.n_layers} layers x top-{trace.top_k} "
          f"= {trace.expert_ids.size:,} accesses; device {args.device}; best of {args.repeats}")

    print("\n1. accesses replayed per second (budget 25%)")
    print(f"{'configuration':<34} {'wall s':>8} {'accesses/s':>12} {'vs target':>10} {'+bounds s':>10}")
    for label, kw in (("lru, no prefetch", dict(eviction="lru", predictor="none")),
                      ("lru, history prefetch (lookahead 2)", dict(eviction="lru", predictor="history")),
                      ("lru, oracle prefetch (lookahead 2)", dict(eviction="lru", predictor="oracle")),
                      ("belady, no prefetch", dict(eviction="belady", predictor="none"))):
        rep = replay(trace, cost, args.repeats if "none" == kw["predictor"] else 1, budget="25%", **kw)
        rate = rep["accesses_per_wall_s"]
        print(f"{label:<34} {rep['wall_s']:>8.2f} {rate:>12,.0f} {rate / TARGET:>9.2f}x "
              f"{rep['with_bounds_s']:>10.2f}")

    print("\n2. replay time against trace length (lru, no prefetch, budget 25%)")
    print(f"{'tokens':>7} {'accesses':>10} {'wall s':>8} {'us/token':>9} {'ratio to first':>15}")
    first = None
    for t in ((250, 500, 1000, 2000) if args.quick else (1000, 2000, 4000, 8000)):
        t = min(t, full.n_tokens)
        rep = replay(full.slice(0, t), cost, args.repeats, budget="25%")
        per_tok = rep["wall_s"] / t * 1e6
        first = first or per_tok
        print(f"{t:>7} {rep['accesses']:>10,} {rep['wall_s']:>8.2f} {per_tok:>9.1f} {per_tok / first:>15.2f}")

    print("\n3. replay time against budget (lru, no prefetch)")
    print(f"{'budget':>7} {'miss rate':>10} {'wall s':>8} {'accesses/s':>12} {'vs target':>10}")
    for b in ("10%", "25%", "50%", "75%", "100%"):
        rep = replay(trace, cost, args.repeats, budget=b)
        rate = rep["accesses_per_wall_s"]
        print(f"{b:>7} {rep['misses'] / rep['accesses']:>10.3f} {rep['wall_s']:>8.2f} {rate:>12,.0f} "
              f"{rate / TARGET:>9.2f}x")


def sweep_cost(n_points: int = 5000) -> dict:
    """Wall time per finished point, and the time recording it takes, near point 100 and point ``n_points``."""
    import yaml

    from simulator import sweep, sweep_store

    stamps, costs = [], []
    record = sweep_store.SweepStore.record

    def timed(self, row):
        t0 = time.perf_counter()
        record(self, row)
        costs.append(time.perf_counter() - t0)
        stamps.append(time.perf_counter())
    sweep_store.SweepStore.record = timed
    with tempfile.TemporaryDirectory() as tmp:
        exp = Path(tmp) / "e.yaml"
        exp.write_text(yaml.safe_dump({"name": "cost", "trace": str(REPO / "traces/deepseek-v2-lite-law.npz"),
                                       "tokens": 2,  # budgets of 10**9 + i bytes: distinct keys, the same slots
                                       "budgets": [f"{10**9 + i}B" for i in range(n_points)],
                                       "evictions": ["lru"], "predictors": ["none"], "devices": ["t4"]}))
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            sweep.run_experiment(exp, out=str(Path(tmp) / "out"), workers=1, max_points=max(n_points, 1))
    sweep_store.SweepStore.record = record
    at = {}
    for k in (100, n_points):  # points k-24..k+25 (1-based), clipped to the sweep
        lo, hi = max(1, k - 25), min(len(stamps) - 1, k + 24)
        at[k] = {"wall_ms": round((stamps[hi] - stamps[lo - 1]) / (hi - lo + 1) * 1e3, 3),
                 "record_us": round(sum(costs[lo:hi + 1]) / (hi - lo + 1) * 1e6, 2)}
    first, last = at[100], at[n_points]
    return {"points": n_points, "at": at, "wall_ratio": round(last["wall_ms"] / first["wall_ms"], 3),
            "record_ratio": round(last["record_us"] / first["record_us"], 3), "load_average": os.getloadavg()[0]}


def figures(args) -> dict:
    """accesses/s per predictor, replay vs bounds time, and the start-up ratio (see the module docstring)."""
    full, spec = load_inputs(REPO / "traces/deepseek-v2-lite-law.npz")
    cost = CostModel(spec, load_device(args.device))
    trace = full.slice(0, min(500 if args.quick else args.tokens, full.n_tokens))
    w = build_workload(trace, 1)
    rates: dict = {}
    replay_s = bounds_s = float("inf")
    for _ in range(args.repeats):  # rounds; within one, every configuration once
        for pred in ("none", "history", "oracle"):
            r = Replay(trace, cost, ReplayOptions(budget="25%", predictor=pred, lookahead=2), workload=w)
            rep = r.run()
            rates[pred] = max(rates.get(pred, 0.0), rep["accesses_per_wall_s"])
            if pred == "none":
                replay_s = min(replay_s, rep["wall_s"])
                t0 = time.perf_counter()
                B.belady_misses(w.ids, r.n_slots, "global", trace.n_layers)
                bounds_s = min(bounds_s, time.perf_counter() - t0)
    startup = startup_ratio(full if not args.quick else trace, cost, args)
    return {"trace": "deepseek-v2-lite-law.npz", "tokens": trace.n_tokens, "accesses": int(w.n_unique.sum()),
            "device": args.device, "budget": "25%", "lookahead": 2, "repeats": args.repeats,
            "accesses_per_s": {k: round(v) for k, v in rates.items()},
            "ratio_to_none": {k: round(v / rates["none"], 3) for k, v in rates.items()},
            "replay_s": round(replay_s, 4), "bounds_s": round(bounds_s, 4),
            "bounds_over_replay": round(bounds_s / replay_s, 3), **startup,
            "load_average": os.getloadavg()[0]}


def startup_ratio(trace, cost, args) -> dict:
    """A `moe-sim replay` process (cold bounds cache) over the in-process Replay.run() with bounds."""
    inproc = proc = float("inf")
    argv = ["moe-sim", "replay", "--trace", str(REPO / "traces/deepseek-v2-lite-law.npz"), "--device", args.device,
            "--budget", "25%", "--tokens", str(trace.n_tokens), "--json"]
    for _ in range(args.repeats):
        B._MEMO.clear()
        t0 = time.perf_counter()
        Replay(trace, cost, ReplayOptions(budget="25%", tokens=trace.n_tokens)).run()
        inproc = min(inproc, time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as cache:  # cold: nothing cached
            t0 = time.perf_counter()
            subprocess.run(argv + ["--bounds-cache", cache], check=True, stdout=subprocess.DEVNULL)
            proc = min(proc, time.perf_counter() - t0)
    return {"startup_tokens": trace.n_tokens, "process_s": round(proc, 3), "in_process_run_s": round(inproc, 3),
            "startup_ratio": round(proc / inproc, 3)}


if __name__ == "__main__":
    main()
