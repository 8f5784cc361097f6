"""`moe-sim`: replay routing traces on modelled devices (``replay``), sweep a grid (``sweep``), or plan (``plan``).

Flags are defined once, by the fields of ``ReplayOptions`` (the runtime's
``OffloadOptions`` plus the replay's own; ``moe_runtime/cli/options.py`` turns
them into flags), so the shared options have the same names, help and
defaults as in ``moe-runtime generate`` and no default is typed twice. Errors are one line (``moe-sim: error: ...``, exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys


from moe_runtime.core.options import DEFAULT_BUDGET, DEFAULT_HOST_PROFILE, DEFAULT_MISS_POLICY
from moe_runtime.core.flags import add_option_flags, options_from_args
from moe_runtime.core.errors import ArgumentParser, run_cli
from moe_runtime.core.outputs import FORCE_HELP, check_output, check_output_dir, write_json_atomic
from moe_runtime.core.timeline import Timeline

from .bounds import DEFAULT_CACHE_DIR, BoundsCache
from .cost_model import CostModel
from .device import load_device
from .replay import Replay, ReplayOptions, load_inputs
from .sweep import MAX_POINTS

def run_replay(args) -> int:
    opts = options_from_args(ReplayOptions, args)
    opts = opts.for_source(opts.source_kind)  # the command's miss policy (options built in code copy; options.py)
    inputs = [args.trace, args.device, args.model, args.bounds_cache]  # names that are no path match nothing
    for flag, path, kind in (("--out", args.out, "replay report"), ("--timeline", args.timeline, "timeline")):
        if path:  # before the work: a report that cannot be written, or would replace an input, is refused now
            check_output(path, flag, inputs=inputs, kind=kind, force=args.force)
    if args.bounds_cache:  # a folder of small files: never a file, a bundled folder or an input
        check_output_dir(args.bounds_cache, "--bounds-cache", inputs=[args.trace, args.device, args.model])
    trace, spec = load_inputs(args.trace, args.model, opts.tokens)
    device = load_device(args.device)
    timeline = Timeline("moe-sim") if args.timeline else None
    cache = BoundsCache(args.bounds_cache) if args.bounds_cache else None
    rep = Replay(trace, CostModel(spec, device), opts, timeline=timeline, bounds_cache=cache, fit_check=True).run()
    rep["trace"] = str(args.trace)
    if timeline is not None:
        timeline.write(args.timeline)
    if args.out:
        write_json_atomic(args.out, rep)
    if args.json:
        json.dump(rep, sys.stdout, indent=1)
        print()
        return 0
    b = rep["bounds"]
    print(f"{rep['model']} on {rep['device']}{' (nominal)' if rep['device_nominal'] else ' (profiled)'}: "
          f"{rep['tokens']} tokens in {rep['steps']} steps, budget {opts.budget} = {rep['n_slots']} experts "
          f"({rep['budget_bytes'] / 2**30:.2f} GiB, {100 * rep['budget_fraction']:.1f}%), "
          f"{opts.eviction}, predictor {opts.predictor}"
          + (f" (lookahead {opts.lookahead})" if opts.prefetching else "") + f", scope {opts.scope}, "
          f"miss policy {rep['miss_policy']}" + (f" on host {rep['host_profile']}" if rep["host_profile"] else "")
          + (f", host layers {rep['host_layers']}" if rep["host_layers"] else ""))
    print(f"  accesses {rep['accesses']:,}: hits {rep['hits']:,} ({100 * rep['hit_rate']:.1f}%), "
          f"late {rep['late']:,}, misses {rep['misses']:,}")
    print(f"  prefetches issued {rep['prefetch_issued']:,}, used {rep['prefetch_used']:,}, "
          f"wasted {rep['prefetch_wasted']:,}; copied {rep['bytes_h2d'] / 1e9:.2f} GB")
    if rep.get("expert_source") == "disk":
        tier = (f"host tier of {rep['host_slots']:,} experts: hits {rep['host_hits']:,}, misses "
                f"{rep['host_misses']:,}; " if "host_slots" in rep else "")
        print(f"  experts on disk: {tier}read {rep['bytes_read'] / 1e9:.2f} GB from storage")
    if rep["host_profile"]:
        print(f"  host computed {rep['host_computed']:,} experts in {rep['host_s']:.3f} s of host time; fills "
              f"{rep['fills']:,}")
    m = rep["memory"]
    used = m["dense_bytes"] + m["kv_bytes"] + m["workspace_bytes"] + rep["budget_bytes"]
    print(f"  device memory: dense {m['dense_bytes'] / 1e9:.2f} + KV {m['kv_bytes'] / 1e9:.2f} (context "
          f"{m['context']} x batch {m['batch']}) + workspace {m['workspace_bytes'] / 1e9:.2f} + experts "
          f"{rep['budget_bytes'] / 1e9:.2f} = {used / 1e9:.2f} GB of the device's {m['device_bytes'] / 1e9:.2f} GB")
    print(f"  compute {rep['compute_s']:.3f} s + stall {rep['stall_s']:.3f} s"
          + (f" + waiting for the host {rep['host_wait_s']:.3f} s" if rep["host_wait_s"] else "")
          + f" = {rep['total_s']:.3f} s -> {rep['tokens_per_s']:.2f} tokens/s")
    floor = (f", with host compute {b['hybrid_floor_tokens_per_s']:.2f}" if "hybrid_floor_s" in b else "")
    hyb = (f"; hybrid at Belady's residency {b['best_hybrid_tokens_per_s']:.2f} (a comparison, not a bound)"
           if "best_hybrid_tokens_per_s" in b else "")
    print(f"  bounds: all-resident {b['all_resident_tokens_per_s']:.2f} tokens/s; best possible at this budget: "
          f"copy-only {b['best_tokens_per_s']:.2f}{floor} tokens/s (Belady misses {b['belady_misses']:,}){hyb}")
    print(f"  replayed {rep['accesses_per_wall_s']:,.0f} accesses/s of wall time")
    if args.timeline:
        print(f"  timeline: {args.timeline} (open in https://ui.perfetto.dev)")
    return 0


def run_sweep(args) -> int:
    from .sweep import run_experiment
    return run_experiment(args.experiment, out=args.out, workers=args.workers, backend=args.backend,
                          address=args.address, max_points=args.max_points)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="moe-sim", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("replay", help="replay one trace with one configuration")
    r.add_argument("--trace", required=True, help="trace file (.npz, see traces/FORMAT.md)")
    r.add_argument("--device", required=True, help="device name in configs/devices or a YAML file "
                                                   "(e.g. one written by moe-runtime profile)")
    r.add_argument("--model", default=None, help="model name in configs/models, a YAML file or a checkpoint "
                                                 "directory (default: the trace's meta.model)")
    add_option_flags(r.add_argument_group("offloading and replay options"), ReplayOptions,
                     default_note={"budget": DEFAULT_BUDGET["replay"].replace("%", "%%"),
                                   "miss_policy": f"{DEFAULT_MISS_POLICY['command']} (copy with --expert-source disk)",
                                   "host_profile": DEFAULT_HOST_PROFILE}, executor=False)
    r.add_argument("--json", action="store_true", help="print the full report as JSON")
    r.add_argument("--out", default=None, help="also write the JSON report to this file (atomically)")
    r.add_argument("--timeline", default=None, help="write a Chrome/Perfetto trace-event JSON here")
    r.add_argument("--bounds-cache", default=DEFAULT_CACHE_DIR, metavar="DIR",
                   help=f"keep the Belady bound here across runs (default {DEFAULT_CACHE_DIR}; '' for none)")
    r.add_argument("--force", action="store_true", help=FORCE_HELP)
    r.set_defaults(_run=run_replay)
    s = sub.add_parser("sweep", help="run an experiment grid (budgets x policies x predictors x ...)")
    s.add_argument("experiment", help="experiment YAML (see configs/experiments/quickstart.yaml)")
    s.add_argument("--out", default=None, help="output directory (default: the experiment's out, "
                                               "or out/<name>)")
    s.add_argument("--workers", type=int, default=None, help="parallel processes (default: min(2, CPUs)); "
                                                              "with --backend ray, the CPUs of a local Ray instance")
    s.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local: a process pool on this machine (default); ray: each point a Ray task")
    s.add_argument("--address", default=None, help="with --backend ray: the Ray cluster to join (e.g. auto, or "
                                                   "HOST:6379 after `ray start --head`); default a local instance")
    s.add_argument("--max-points", type=int, default=MAX_POINTS, metavar="N",
                   help=f"refuse a grid of more points than this (default {MAX_POINTS:,})")
    s.set_defaults(_run=run_sweep)
    from . import plan
    pl = sub.add_parser("plan", help="from a device, a host and a model to the fastest configuration that fits",
                        description=plan.__doc__.splitlines()[0])
    plan.add_arguments(pl)
    pl.set_defaults(_run=plan.run)
    return parser


def main(argv: list[str] | None = None) -> None:
    def body():
        args = build_parser().parse_args(argv)
        return args._run(args)
    run_cli(body, "moe-sim")


if __name__ == "__main__":
    main()
