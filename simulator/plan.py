"""`moe-sim plan`: from "this GPU, this RAM, this model" to a configuration that runs, and its expected speed.

The plan: the model's shape (configs/models name, YAML, or checkpoint
directory), the device (``--device-memory`` overrides its memory), the host
(``--host-profile``, default ``plan_inputs.default_host_profile``; ``--host-ram``,
default this machine's), the batch and context. It refuses, naming the
numbers, a model that cannot run at all (``Planner.check_runnable``). It
picks a trace (``plan_inputs.choose_trace``), searches the configurations the
executor can run (``plan_search``: miss policy, predictor and lookahead,
eviction, host layers, scope, budget, expert format with ``--allow-dtype``,
disk tier and host budget with ``--disk``), prints the five best with their
predicted tokens/s, bound, memory per tier and ratio to the plain default, and
writes the best as YAML (``--out``, default plan.yaml): the options under their
field names, which ``moe-runtime generate --config`` takes, plus ``expected:``.
The file starts ``# moe-sim plan: `` (the ``plan`` kind of core/outputs.py):
``--out`` never replaces an input of the run, and replaces another kind of
file only with ``--force``. The inputs (device, host profile, trace, predictor
quality) are checked before the search, each with its own error line.

Objectives: ``throughput`` maximises aggregate tokens/s at ``--batch``;
``latency`` minimises seconds per token of one sequence (batch 1; every
replayed step is a decode step).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from moe_runtime.core.config_files import short
from moe_runtime.core.errors import MoeError
from moe_runtime.core.flags import integer, number
from moe_runtime.core.format_sizes import CODECS
from moe_runtime.core.host_profile import load_host
from moe_runtime.core.options import MemoryOptions
from moe_runtime.core.outputs import FORCE_HELP, check_output, write_text_atomic
from moe_runtime.core.shapes import ModelSpec, load_model_spec

from .device import load_device
from .plan_inputs import ROUTER_PREDICTORS, choose_trace, default_host_profile, host_ram_bytes, \
    load_predictor_quality
from .plan_search import Planner, Space, evictions_for_executor

_HYB = {f: getattr(MemoryOptions, f) for f in ("context", "workspace")}
QUANTIZED = ("int8", "int4")
# the plan's options, by field name (what `moe-runtime generate --config` reads)
OPTION_KEYS = ("budget", "eviction", "scope", "predictor", "lookahead", "max_inflight", "expert_source",
               "host_budget", "miss_policy", "n_host_layers", "host_profile", "expert_dtype")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model: a name in configs/models, a YAML file or a checkpoint "
                                                   "directory (config.json)")
    p.add_argument("--device", required=True, help="device name in configs/devices or a YAML file")
    p.add_argument("--device-memory", type=number(0, lo_open=True), metavar="GiB",
                   help="device memory to plan for (default: the device's; GPUs are shared)")
    p.add_argument("--host-profile", default=None, help="host profile: a name in configs/hosts or a YAML file "
                                                        "(default: this machine's measured one, else ddr5-desktop)")
    p.add_argument("--host-ram", type=number(0, lo_open=True), metavar="GiB",
                   help="host RAM (default: this machine's)")
    p.add_argument("--disk", action="store_true", help="also plan experts on storage with a host-RAM tier")
    p.add_argument("--context", type=integer(1), default=_HYB["context"],
                   help=f"positions per sequence the KV cache holds (default {_HYB['context']})")
    p.add_argument("--batch", type=integer(1, 1 << 12), default=1, help="sequences decoded together (default 1)")
    p.add_argument("--workspace", default=_HYB["workspace"],
                   help=f"device memory kept for the CUDA context and activations (default {_HYB['workspace']})")
    p.add_argument("--trace", default=None, help="routing trace of the model (default: a bundled one, else "
                                                 "a synthetic one fitted to a bundled trace)")
    p.add_argument("--tokens", type=integer(16), default=None,
                   help="tokens replayed per configuration (default 300 x batch, at most 4096)")
    p.add_argument("--allow-dtype", default="", metavar="LIST",
                   help="also search these expert formats (int8,int4): they change the output")
    p.add_argument("--predictor-quality", metavar="FILE",
                   help="JSON of `moe-runtime eval-predictors --json` for this model: gate/aligned are then "
                        "searched, modelled as noisy-oracle with the measured recall and precision")
    p.add_argument("--adapters", metavar="FILE", help="aligned adapters to name in the plan (with aligned)")
    p.add_argument("--objective", choices=["throughput", "latency"], default="throughput",
                   help="throughput: tokens/s at --batch; latency: seconds per token at batch 1 "
                        "(default throughput)")
    p.add_argument("--out", default="plan.yaml", help="where to write the best configuration (default plan.yaml)")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--seed", type=integer(0), default=0, help="seed of synthetic traces and noisy-oracle")


def model_spec(name) -> ModelSpec:
    if (Path(name) / "config.json").is_file():
        try:
            cfg = json.loads((Path(name) / "config.json").read_text())
        except ValueError as e:
            raise MoeError(f"{name}/config.json: not valid JSON ({e})") from None
        return ModelSpec.from_hf_config(cfg, name=Path(name).name)
    return load_model_spec(name)


def plan_inputs(args, host_profile) -> list:
    """The paths this run reads (names of bundled files are no paths and match nothing that exists)."""
    paths = [args.model, args.device, host_profile, args.trace, args.predictor_quality, args.adapters]
    return [p for p in paths if p and os.path.lexists(p)]


def build_space(spec, args, quality: dict, cpu: bool = False) -> Space:
    L = spec.n_moe_layers
    preds = [("none", 1)] + [(p, la) for p, la in (("history", 1), ("history", 2), ("popularity", 1)) if la < L]
    for name, (rec, _) in quality.items():
        if name == "aligned" and not args.adapters:
            continue
        preds += [(name, d) for d in range(1, min(len(rec), 3) + 1) if d < L]
    dtypes = [None]
    for d in (x.strip() for x in args.allow_dtype.split(",") if x.strip()):
        if d not in CODECS:
            raise MoeError(f"--allow-dtype: unknown format {short(d)}; one of {', '.join(CODECS)}")
        if d != (spec.expert_dtype or spec.dtype):
            dtypes.append(d)
    sources = [("memory", 1.0)] + ([("disk", 1.0), ("disk", 0.5)] if args.disk else [])
    if cpu:  # one machine: the host is the device, and on disk the expert budget is the RAM tier
        return Space(miss_policies=("copy",), predictors=tuple(preds), evictions=evictions_for_executor(),
                     n_host_layers=(0,), expert_dtypes=tuple(dtypes),
                     sources=(("disk", 1.0),) if args.disk else (("memory", 1.0),))
    return Space(predictors=tuple(preds), evictions=evictions_for_executor(),
                 n_host_layers=tuple(sorted({0, L // 4, L // 2, L})),
                 expert_dtypes=tuple(dtypes), sources=tuple(sources))


def describe(point, cpu: bool = False) -> str:
    p = point
    s = f"{p.miss_policy}, {p.eviction}, {p.predictor}" + (f"@{p.lookahead}" if p.predictor != "none" else "")
    if p.n_host_layers:
        s += f", {p.n_host_layers} host layers"
    if p.scope != "global":
        s += f", {p.scope}"
    if p.budget_share != 1.0:
        s += f", {p.budget_share:.0%} of fit"
    if p.expert_dtype:
        s += f", {p.expert_dtype}"
    if p.expert_source == "disk":
        s += ", disk" + (f" + host tier {p.host_share:.0%}" if not cpu else "")
    return s


def tiers(planner: Planner, row: dict) -> dict:
    """Bytes per tier of one row: device (dense + KV + workspace + experts), host RAM (experts), disk."""
    m, eb = row["memory"], row["expert_bytes"]
    all_experts = planner.fmt_spec(row["point"].expert_dtype).total_expert_bytes
    disk = row["point"].expert_source == "disk"
    return {"device_bytes": m["dense_bytes"] + m["kv_bytes"] + m["workspace_bytes"] + row["n_slots"] * eb,
            "device_experts_bytes": row["n_slots"] * eb, "dense_bytes": m["dense_bytes"], "kv_bytes": m["kv_bytes"],
            "workspace_bytes": m["workspace_bytes"], "device_memory_bytes": m["device_bytes"],
            "host_experts_bytes": 0 if disk and planner.cpu else row["host_slots"] * eb if disk else all_experts,
            "disk_bytes": all_experts if disk else 0}


def plan_options(row: dict, args) -> dict:
    """The configuration under the options' field names (``moe-runtime generate --config``)."""
    o, p = row["options"], row["point"]
    out = {k: o[k] for k in OPTION_KEYS}
    out["budget"] = str(row["n_slots"])
    out["predictor"] = p.predictor  # gate/aligned run as themselves; the replay modelled them as noisy-oracle
    out["expert_dtype"] = p.expert_dtype or "auto"
    if p.predictor == "aligned":
        out["adapters"] = args.adapters
    return out


def run(args) -> int:
    t0 = time.perf_counter()
    host_profile, host_why = (args.host_profile, "given") if args.host_profile else default_host_profile()
    if args.out:  # before the work: the plan never replaces an input of its run, nor another kind of file
        check_output(args.out, "--out", inputs=plan_inputs(args, host_profile), kind="plan", force=args.force)
    if args.objective == "latency" and args.batch != 1:
        raise MoeError("--objective latency is seconds per token of one sequence: give --batch 1 (or throughput)")
    spec = model_spec(args.model)
    device = load_device(args.device)
    if args.device_memory:
        device = replace(device, memory_gib=args.device_memory)
    load_host(host_profile)  # its own error line now, not every hybrid point failing later for it
    ram = int(args.host_ram * 2**30) if args.host_ram else host_ram_bytes()
    ram_why = "given" if args.host_ram else "this machine's"
    quality = load_predictor_quality(args.predictor_quality) if args.predictor_quality else {}
    if args.disk and not device.has_storage:
        raise MoeError(f"--disk needs the device profile's storage link; {device.name} has none")
    tokens = args.tokens or min(300 * args.batch, 4096)
    choice = choose_trace(spec, trace_path=args.trace, tokens=tokens, batch=args.batch, seed=args.seed)
    planner = Planner(spec, device, choice.trace, batch=args.batch, context=args.context, workspace=args.workspace,
                      host_profile=host_profile, host_ram_bytes=ram, quality=quality, seed=args.seed)
    space = build_space(spec, args, quality, planner.cpu)
    planner.check_runnable(space)
    best = planner.search(space)
    plain = planner.evaluate(planner.plain(space))
    wall = time.perf_counter() - t0
    result = summary(planner, best, plain, choice, args, host_profile, host_why, ram, ram_why, wall)
    if args.out:
        write_text_atomic(args.out, plan_yaml(result))
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        print_result(planner, result, args)
    return 0


def summary(planner, best, plain, choice, args, host_profile, host_why, ram, ram_why, wall) -> dict:
    def entry(row):
        return {"config": describe(row["point"], planner.cpu), "options": plan_options(row, args),
                "tokens_per_s": row["tokens_per_s"], "seconds_per_token": args.batch / row["tokens_per_s"],
                "bound_tokens_per_s": row["bound_tokens_per_s"], "ratio_to_default": row["tokens_per_s"] /
                plain["tokens_per_s"], "memory": tiers(planner, row), "n_slots": row["n_slots"],
                "host_computed": row["host_computed"], "misses": row["misses"]}
    modelled = {}
    if best["point"].predictor in ROUTER_PREDICTORS:
        o = best["options"]
        modelled = {"predictor_model": f"noisy-oracle, recall {o['recall']:.3f}, precision {o['precision']:.3f} "
                                       f"(measured, {args.predictor_quality})"}
    elif not planner.quality:
        modelled = {"predictor_model": "trace-based predictors only (no --predictor-quality: gate/aligned not "
                                       "searched)"}
    return {"model": planner.spec.name, "device": planner.device.name,
            "device_memory_gib": planner.device.memory_gib, "host_profile": host_profile,
            "host_profile_why": host_why, "host_ram_gib": ram / 2**30, "host_ram_why": ram_why,
            "batch": args.batch, "context": args.context, "objective": args.objective, "trace": choice.words,
            "trace_kind": choice.kind, "tokens_replayed": int(planner.workload.n_tokens.sum()),
            "simulated": len(planner.rows), "pruned": planner.pruned, "not_runnable": planner.invalid,
            "not_runnable_why": planner.why_none() if planner.reasons else "",
            "wall_s": wall, "best": entry(best), "default": entry(plain),
            "top": [entry(r) for r in planner.top(5)], **modelled}


def plan_yaml(result: dict) -> str:
    import yaml
    b = result["best"]
    expected = {k: result[k] for k in ("model", "device", "device_memory_gib", "host_profile", "host_ram_gib",
                                       "batch", "context", "objective", "trace", "tokens_replayed")}
    expected.update(tokens_per_s=round(b["tokens_per_s"], 4), seconds_per_token=round(b["seconds_per_token"], 6),
                    bound_tokens_per_s=round(b["bound_tokens_per_s"], 4),
                    default_tokens_per_s=round(result["default"]["tokens_per_s"], 4),
                    ratio_to_default=round(b["ratio_to_default"], 4), config=b["config"], memory=b["memory"])
    if "predictor_model" in result:
        expected["predictor_model"] = result["predictor_model"]
    head = (f"# moe-sim plan: {result['model']} on {result['device']}; run it with\n"
            f"#   moe-runtime generate --config THIS_FILE --model CHECKPOINT_DIR --prompt ...\n")
    return head + yaml.safe_dump({**b["options"], "expected": expected}, sort_keys=False)


def print_result(planner, r: dict, args) -> None:
    g = lambda n: f"{n / 1e9:.1f}"  # noqa: E731
    print(f"{r['model']} on {r['device']} ({r['device_memory_gib']:g} GiB), batch {r['batch']}, context "
          f"{r['context']}, objective {r['objective']}")
    print(f"  host: profile {r['host_profile']} ({r['host_profile_why']}), RAM {r['host_ram_gib']:.1f} GiB "
          f"({r['host_ram_why']})")
    print(f"  trace: {r['trace']}")
    if "predictor_model" in r:
        print(f"  predictors: {r['predictor_model']}")
    lat = r["objective"] == "latency"
    print(f"  {'#':>2} {'ms/token' if lat else 'tok/s':>9} {'bound':>8} {'x default':>9} {'device GB':>9} "
          f"{'host GB':>7} {'disk GB':>7}  configuration")
    for i, e in enumerate(r["top"], 1):
        m = e["memory"]
        v = f"{1e3 * e['seconds_per_token']:9.2f}" if lat else f"{e['tokens_per_s']:9.2f}"
        # the bound in the objective's unit: a latency floor in ms per step, else a tokens/s ceiling
        bound = 1e3 * r["batch"] / e["bound_tokens_per_s"] if lat else e["bound_tokens_per_s"]
        print(f"  {i:>2} {v} {bound:8.2f} {e['ratio_to_default']:9.2f} {g(m['device_bytes']):>9} "
              f"{g(m['host_experts_bytes']):>7} {g(m['disk_bytes']):>7}  {e['config']}")
    print(f"  (bound, {'a floor in ms/token' if lat else 'a ceiling in tok/s'}: copy-only rows, Belady's misses at "
          "full bandwidth; rows that compute on the host, the device's and the host's compute split at best, "
          "no copies)")
    d = r["default"]
    print(f"  plain default (LRU, no prefetch, copy-only, largest budget that fits): {d['tokens_per_s']:.2f} tok/s")
    print(f"  simulated {r['simulated']} configurations, pruned {r['pruned']} by their bound, "
          f"{r['not_runnable']} not runnable; {r['tokens_replayed']} tokens each; {r['wall_s']:.1f} s")
    if r["not_runnable_why"]:
        print(f"  not runnable: {r['not_runnable_why']}")
    if args.out:
        print(f"wrote {args.out}: run it with  moe-runtime generate --config {args.out} --model CHECKPOINT_DIR "
              "--prompt ...", file=sys.stdout)
