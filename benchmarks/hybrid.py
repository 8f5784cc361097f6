"""Hybrid execution in the simulator: copy-only against host compute, per model, device, host and batch.

    python3 benchmarks/hybrid.py [--json] [--markdown] [--workers 2] [--steps 64] [--tokens1 300]

For each model trace, device (rtx-4060-8gb, rtx-3060-12gb, t4), budget (the largest that fits, ``fit``, and
half of it, ``fit:50%``, at the run's batch and ``--context``), host (ddr5-desktop, nominal, and
this-machine-epyc-2core, measured here by benchmarks/host_experts.py) and batch (1, 4, 16, 64) it replays (the static split and the predictors on ddr5-desktop only, to keep the run
to about 10 minutes on 2 shared cores):

- copy-only (``--miss-policy copy``), host-only (``host``: every routed expert on the host, as KTransformers
  does; the cache stays cold), the static split (``copy`` with ``--n-host-layers N``: llama.cpp's
  ``--n-cpu-moe``) at the best N of L/4, L/2, 3L/4, and ``auto``, alone and with the oracle, noisy-oracle
  and history predictors (lookahead 2);
- traces: DeepSeek-V2-Lite (law) and Mixtral-8x7B (humaneval) as bundled at batch 1 (the first
  ``--tokens1`` tokens); GPT-OSS-20B and Qwen3-30B-A3B at every batch, and the two bundled models at
  batch > 1, on synthetic traces (moe_runtime/traces/synth.py) whose knobs are fitted to the bundled trace
  (DeepSeek-V2-Lite's law trace for the two models without one), ``--steps`` (32) steps of B sequences
  of ``--steps`` tokens, so every lane decodes one sequence at a time (at most 64 x 32 = 2048 tokens a run);
- the effective batch (tokens / steps) of each run is reported.

It prints tok/s per configuration, the crossover batch above which copying wins for each (model, device,
host): measured (the first batch whose copy-only beats host-only), the cost rule's tokens per expert at
which a copy (plus the device's compute) gets cheaper than the host (Fiddler's rule) and the batch that
puts that many tokens on an average active expert, beside llama.cpp's fixed rule (batch >= 32 copies);
and the two targets: auto never more than 2% below the better of copy-only and host-only, and at batch 1
DeepSeek-V2-Lite on rtx-4060-8gb with ddr5-desktop at a 10% and a 15% budget, auto >= 2x copy-only.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moe_runtime.core.errors import MoeError  # noqa: E402
from moe_runtime.core.host_profile import load_host  # noqa: E402
from moe_runtime.core.shapes import load_model_spec  # noqa: E402
from moe_runtime.traces import load_trace  # noqa: E402
from moe_runtime.traces.format import TraceMeta  # noqa: E402
from moe_runtime.traces.synth import fit_knobs, synth_trace  # noqa: E402
from simulator.cost_model import CostModel  # noqa: E402
from simulator.device import load_device  # noqa: E402
from simulator.replay import Replay, ReplayOptions  # noqa: E402

MODELS = {"deepseek-v2-lite": "traces/deepseek-v2-lite-law.npz", "mixtral-8x7b": "traces/mixtral-8x7b-humaneval.npz",
          "gpt-oss-20b": None, "qwen3-30b-a3b": None}
FIT_FROM = {"gpt-oss-20b": "traces/deepseek-v2-lite-law.npz", "qwen3-30b-a3b": "traces/deepseek-v2-lite-law.npz"}
DEVICES = ("rtx-4060-8gb", "rtx-3060-12gb", "t4")
HOSTS = ("ddr5-desktop", "this-machine-epyc-2core")
BATCHES = (1, 4, 16, 64)
BUDGETS = ("fit", "fit:50%")
PREDICTED = ("oracle", "noisy-oracle", "history")
LLAMA_CPP_BATCH = 32
_TRACES: dict = {}


def trace_for(model: str, batch: int, steps: int, tokens1: int, knobs: dict):
    key = (model, batch)
    if key not in _TRACES:
        spec = load_model_spec(model)
        if batch == 1 and MODELS[model]:
            tr = load_trace(REPO / MODELS[model])
            tr = tr.slice(0, min(tokens1, tr.n_tokens))
        else:
            meta = TraceMeta.for_spec(spec, source=f"synthetic, knobs fitted to {MODELS[model] or FIT_FROM[model]}")
            tr = synth_trace(meta, steps * batch, knobs[model], seed=0, seq_len=steps)
        _TRACES[key] = (tr, spec)
    return _TRACES[key]


def run_one(job) -> dict:
    """One replay; a budget that does not fit (or is below one layer's need) is a row with its error."""
    model, batch, device, budget, host, label, kw, steps, tokens1, context, knobs = job
    tr, spec = trace_for(model, batch, steps, tokens1, knobs)
    row = {"model": model, "batch": batch, "device": device, "budget": budget, "host": host, "config": label}
    try:
        opts = ReplayOptions(budget=budget, batch=batch, context=context, host_profile=host, **kw)
        rep = Replay(tr, CostModel(spec, load_device(device)), opts, fit_check=True).run()
    except MoeError as e:
        row["error"] = str(e)
        return row
    row.update(tokens_per_s=rep["tokens_per_s"], effective_batch=rep["tokens"] / rep["steps"],
               budget_fraction=rep["budget_fraction"], n_slots=rep["n_slots"], hits=rep["hits"],
               misses=rep["misses"], host_computed=rep["host_computed"], fills=rep["fills"],
               stall_s=rep["stall_s"], host_s=rep["host_s"], total_s=rep["total_s"], tokens=rep["tokens"],
               best_copy=rep["bounds"]["best_tokens_per_s"], best_hybrid=rep["bounds"].get("best_hybrid_tokens_per_s"),
               resident=rep["bounds"]["all_resident_tokens_per_s"])
    return row


def jobs(steps: int, tokens1: int, context: int, knobs: dict, budgets) -> list:
    out = []
    for model in MODELS:
        L = load_model_spec(model).n_moe_layers
        for batch in BATCHES:
            for device in DEVICES:
                for budget in budgets:
                    common = (steps, tokens1, context, knobs)
                    out.append((model, batch, device, budget, HOSTS[0], "copy", {"miss_policy": "copy"}, *common))
                    for host in HOSTS:
                        cfgs = [("host", {"miss_policy": "host"}), ("auto", {"miss_policy": "auto"})]
                        if host == HOSTS[0]:  # the static split and the predictors on the first host only (time)
                            cfgs += [(f"n-host-layers {n}", {"miss_policy": "copy", "n_host_layers": n})
                                     for n in (L // 4, L // 2, 3 * L // 4)]
                            cfgs += [(f"auto+{p}", {"miss_policy": "auto", "predictor": p, "lookahead": 2})
                                     for p in PREDICTED]
                        out += [(model, batch, device, budget, host, label, kw, *common) for label, kw in cfgs]
    return out


def crossovers(rows: list[dict], context: int) -> list[dict]:
    """Per (model, device, host): measured, cost-rule (Fiddler) and llama.cpp crossover batches."""
    out = []
    for model in MODELS:
        spec = load_model_spec(model)
        codec = spec.expert_dtype or spec.dtype
        for device in DEVICES:
            dev = load_device(device)
            cost = CostModel(spec, dev)
            for host in HOSTS:
                h = load_host(host)
                copy_s = dev.copy_seconds(spec.expert_bytes)
                n_star = None
                for n in range(1, 4097):
                    if h.expert_seconds(codec, spec.expert_bytes, spec.expert_flops_per_token, n) >= \
                            copy_s + cost.expert_seconds(n):
                        n_star = n
                        break
                # tokens on an average active expert at batch B: B*k / (distinct experts) ~ B*k/E when B*k >> E
                b_star = None if n_star is None else max(1, math.ceil(n_star * spec.n_experts / spec.top_k))
                measured = None
                for b in BATCHES:
                    sel = {r["config"]: r for r in rows if r["model"] == model and r["device"] == device
                           and r["budget"] == "fit" and r["batch"] == b and not r.get("error")
                           and (r["host"] == host or r["config"] == "copy")}
                    if "copy" in sel and "host" in sel and sel["copy"]["tokens_per_s"] >= sel["host"]["tokens_per_s"]:
                        measured = b
                        break
                out.append({"model": model, "device": device, "host": host, "measured_batch": measured,
                            "fiddler_tokens_per_expert": n_star, "fiddler_batch": b_star,
                            "llama_cpp_batch": LLAMA_CPP_BATCH})
    return out


def targets(rows: list[dict], tokens1: int, context: int) -> dict:
    """Target 1 over every point of the grid; target 2 at 10% and 15% (replayed here)."""
    worst, misses = None, []
    groups = {}
    for r in rows:
        if not r.get("error"):
            groups.setdefault((r["model"], r["batch"], r["device"], r["budget"], r["host"]), {})[r["config"]] = r
    copies = {(k[0], k[1], k[2], k[3]): g["copy"] for k, g in groups.items() if "copy" in g}
    for k, g in groups.items():
        c = copies.get(k[:4])
        if "auto" not in g or "host" not in g or c is None:
            continue
        better = max(c["tokens_per_s"], g["host"]["tokens_per_s"])
        ratio = g["auto"]["tokens_per_s"] / better
        if worst is None or ratio < worst[0]:
            worst = (ratio, k)
        if ratio < 0.98:
            misses.append({"point": list(k), "auto": g["auto"]["tokens_per_s"], "copy": c["tokens_per_s"],
                           "host": g["host"]["tokens_per_s"], "ratio": ratio})
    t2 = []
    for budget in ("10%", "15%"):
        base = ("deepseek-v2-lite", 1, "rtx-4060-8gb", budget, "ddr5-desktop")
        a = run_one((*base, "auto", {"miss_policy": "auto"}, 64, tokens1, context, {}))
        c = run_one((*base, "copy", {"miss_policy": "copy"}, 64, tokens1, context, {}))
        t2.append({"budget": budget, "auto": a.get("tokens_per_s"), "copy": c.get("tokens_per_s"),
                   "ratio": a["tokens_per_s"] / c["tokens_per_s"] if "tokens_per_s" in a and "tokens_per_s" in c
                   else None, "error": a.get("error") or c.get("error")})
    return {"auto_vs_better_of_copy_and_host": {"worst_ratio": worst[0] if worst else None,
                                                "worst_point": list(worst[1]) if worst else None,
                                                "met": not misses, "misses": misses},
            "dsv2_lite_4060_ddr5_batch1": {"runs": t2, "met": all(x["ratio"] and x["ratio"] >= 2 for x in t2)}}


def markdown(rows: list[dict], cross: list[dict], tg: dict) -> str:
    lines = ["| model | batch (eff.) | device | budget | host | copy | host-only | best n-host-layers | auto | "
             "auto+oracle | auto+noisy | auto+history |", "|" + "---|" * 12]
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["batch"], r["device"], r["budget"]), {}).setdefault(r["host"], {})[
            r["config"]] = r
    for (model, batch, device, budget), by_host in groups.items():
        copy = by_host.get(HOSTS[0], {}).get("copy", {})
        for host in HOSTS:
            g = by_host.get(host, {})
            if copy.get("error"):
                if host == HOSTS[0]:
                    lines.append(f"| {model} | {batch} | {device} | {budget} | - | does not fit | | | | | | |")
                continue

            def v(label):
                r = g.get(label) or {}
                return f"{r['tokens_per_s']:.2f}" if "tokens_per_s" in r else "-"
            nh = [(r["tokens_per_s"], lab.split()[-1]) for lab, r in g.items()
                  if lab.startswith("n-host-layers") and "tokens_per_s" in r]
            best = max(nh) if nh else None
            pct = f"{100 * copy.get('budget_fraction', 0):.1f}%"
            lines.append(f"| {model} | {batch} ({copy.get('effective_batch', 0):.1f}) | {device} | {budget} = {pct} | "
                         f"{host} | {copy.get('tokens_per_s', 0):.2f} | {v('host')} | "
                         + (f"{best[0]:.2f} (N={best[1]})" if best else "-")
                         + f" | {v('auto')} | {v('auto+oracle')} | {v('auto+noisy-oracle')} | {v('auto+history')} |")
    lines += ["", "| model | device | host | measured crossover batch | Fiddler: tokens/expert (batch) | llama.cpp |",
              "|---|---|---|---|---|---|"]
    for c in cross:
        lines.append(f"| {c['model']} | {c['device']} | {c['host']} | {c['measured_batch'] or '> 64'} | "
                     f"{c['fiddler_tokens_per_expert']} ({c['fiddler_batch']}) | {c['llama_cpp_batch']} |")
    t1, t2 = tg["auto_vs_better_of_copy_and_host"], tg["dsv2_lite_4060_ddr5_batch1"]
    lines += ["", f"Target 1 (auto >= 98% of max(copy-only, host-only) everywhere): {'met' if t1['met'] else 'missed'}; "
              f"worst ratio {t1['worst_ratio']:.3f} at {t1['worst_point']}; {len(t1['misses'])} point(s) below 0.98.",
              "Target 2 (batch 1, DeepSeek-V2-Lite, rtx-4060-8gb, ddr5-desktop, auto >= 2x copy-only): "
              f"{'met' if t2['met'] else 'missed'}: " + "; ".join(
                  f"{x['budget']}: auto {x['auto']:.2f} vs copy {x['copy']:.2f} tok/s = {x['ratio']:.2f}x"
                  for x in t2["runs"] if x["ratio"])]
    return "\n".join(lines)


def _init(knobs):
    _TRACES.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object (rows, crossovers, targets)")
    ap.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32, help="steps (and tokens per sequence) of synthetic runs")
    ap.add_argument("--tokens1", type=int, default=300, help="tokens of the bundled traces at batch 1")
    ap.add_argument("--context", type=int, default=1024, help="positions per sequence the KV cache is sized for")
    a = ap.parse_args()
    t0 = time.perf_counter()
    knobs, fitted = {}, {}
    for model in MODELS:  # knobs fitted once per source trace, in this process, then shipped to the workers
        src = MODELS[model] or FIT_FROM[model]
        if src not in fitted:
            fitted[src] = fit_knobs(load_trace(REPO / src), fit_tokens=400, rounds=1)
        knobs[model] = fitted[src]
    todo = jobs(a.steps, a.tokens1, a.context, knobs, BUDGETS)
    if a.workers > 1:
        with multiprocessing.get_context("fork").Pool(a.workers) as pool:
            rows = pool.map(run_one, todo, chunksize=8)
    else:
        rows = [run_one(j) for j in todo]
    cross = crossovers(rows, a.context)
    tg = targets(rows, a.tokens1, a.context)
    out = {"settings": {"steps": a.steps, "tokens_batch1": a.tokens1, "context": a.context, "workers": a.workers,
                        "knobs": {m: vars(k) for m, k in knobs.items()}, "runs": len(rows),
                        "wall_s": time.perf_counter() - t0},
           "rows": rows, "crossovers": cross, "targets": tg}
    if a.json:
        print(json.dumps(out, indent=1, default=str))
    else:
        print(markdown(rows, cross, tg))
        print(f"\n{len(rows)} replays in {out['settings']['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
