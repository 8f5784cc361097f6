"""The offloading flags of `moe-runtime generate`, defined once, and the run they configure.

Contract:

- ``add_arguments(parser)`` adds the offloading flags (budget, policy, scope,
  predictor, lookahead, prefetch width, in-flight cap, forced routing, static
  profile, adapters, trace recording, timeline).
- ``preflight(args)`` reads only config.json (and, when it names no dtype, the
  safetensors header) and refuses a budget below the minimum (one layer's top-k experts
  plus the in-flight slots; times the layers with per-layer scope), and a
  ``--record-trace``/``--timeline`` that cannot be written, before any weight is loaded.
- ``OffloadRun.build(args, model, store, prompt_lens)`` returns None when no
  offloading flag is given (all experts resident, the reference) and otherwise
  the provider and the wrapped model to pass to ``generate()``; ``finish()``
  drains the copies, writes the recorded trace and the timeline, and returns
  the fields ``--json`` adds (see README).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_runtime.core.budget import check_budget, layer_demand, parse_budget, wave_capacity
from moe_runtime.model.checkpoint import DTYPES, SafetensorsReader, expert_format, parse_dtype
from moe_runtime.core.model_config import load_config, read_json
from moe_runtime.core.errors import MoeError
from moe_runtime.model.experts import HostExpertStore
from moe_runtime.offload.forced_routing import ForcedRouting, popularity_from_trace
from moe_runtime.model.transformer import Transformer
from moe_runtime.offload.packed import read_header
from moe_runtime.offload.provider import OffloadedExperts
from moe_runtime.offload.storage import DiskReadEngine, aligned_pool
from moe_runtime.offload.tiered import host_tier_minimum, three_tier_engine
from moe_runtime.offload.tiers import disk_source
from moe_runtime.offload.steps import SteppedModel, steps
from moe_runtime.core.options import DEFAULT_BUDGET, OffloadOptions, parse_expert_source
from moe_runtime.core.flags import add_option_flags, integer, options_from_args
from moe_runtime.core.outputs import FORCE_HELP, check_output
from moe_runtime.predictors import PredictorOptions, make_predictor
from moe_runtime.offload.telemetry import gpu_telemetry
from moe_runtime.traces import TraceMeta, TraceRecorder, load_trace

_DEFAULTS: dict[str, object] = {}  # dest -> default of every offloading flag, filled by add_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("offloading (any of these turns it on; without them every expert is resident)")
    add_option_flags(g, OffloadOptions, default_note={
        "budget": DEFAULT_BUDGET["generate"].replace("%", "%%") + " when another offloading option is given"})
    g.add_argument("--read-depth", type=integer(1, 1024), default=4, metavar="N",
                   help="reads from storage in flight at once (default 4)")
    g.add_argument("--route-from-trace", metavar="FILE", help="force each layer's routing from a trace (.npz)")
    g.add_argument("--trace-seq", type=integer(0), default=0, help="which sequence of that trace (default 0)")
    g.add_argument("--popularity-trace", metavar="FILE", help="trace giving the 'static' policy's hot set")
    g.add_argument("--adapters", metavar="FILE", help="aligned adapters for --predictor aligned")
    g.add_argument("--record-trace", metavar="FILE", help="record the routing (and predictions) to a trace")
    g.add_argument("--timeline", metavar="FILE", help="write a Perfetto/Chrome timeline JSON")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)  # not an offloading flag: outside the group
    _DEFAULTS.update({a.dest: a.default for a in g._group_actions})


def offloading(args: argparse.Namespace) -> bool:
    """True when any offloading flag differs from its default."""
    return any(getattr(args, dest, default) != default for dest, default in _DEFAULTS.items())


def budget_slots(opts: OffloadOptions, *, n_layers: int, n_experts: int, top_k: int, expert_bytes: int,
                 batch: int = 1) -> int:
    """Slots the budget buys, checked against the minimum (MoeError naming it in bytes and experts); a batch
    of B prompts needs a layer's union of B x top-k experts at once."""
    opts.check_model(n_layers)
    n = parse_budget(opts.budget or DEFAULT_BUDGET["generate"], expert_bytes=expert_bytes,
                     total_experts=n_layers * n_experts)
    demand = layer_demand(top_k=top_k, batch=batch, n_experts=n_experts)
    check_budget(n, experts_per_layer=demand, max_inflight=opts.max_inflight, prefetching=opts.prefetching,
                 scope=opts.scope, n_moe_layers=n_layers, expert_bytes=expert_bytes, batch=batch)
    return n


def host_slots(opts: OffloadOptions, *, n_layers: int, n_experts: int, top_k: int, expert_bytes: int,
               batch: int) -> int:
    """The host tier's slots (``--host-budget``, required on a GPU with experts on disk), checked."""
    if opts.host_budget is None:
        raise MoeError("--expert-source disk on a GPU needs --host-budget: the host-RAM tier between storage "
                       "and the GPU slots (e.g. --host-budget 50%)")
    n = parse_budget(opts.host_budget, expert_bytes=expert_bytes, total_experts=n_layers * n_experts)
    need = host_tier_minimum(layer_demand(top_k=top_k, batch=batch, n_experts=n_experts),
                             opts.max_inflight if opts.prefetching else 0)
    if n < need:
        raise MoeError(f"--host-budget of {n} experts is below the host tier's minimum of {need} "
                       f"({need * expert_bytes:,} bytes): every copy in flight holds a host slot")
    return n


def expert_source(args: argparse.Namespace) -> tuple[str, str | None]:
    """(kind, packed file) of ``--expert-source``, checked (MoeError) with the tiers it allows."""
    kind, path = parse_expert_source(args.expert_source)
    if args.read_depth < 1:
        raise MoeError(f"--read-depth must be at least 1, got {args.read_depth}")
    if args.host_budget is not None:
        if kind == "memory":
            raise MoeError("--host-budget sizes the host tier under --expert-source disk; experts in memory "
                           "are all in host memory already")
        if torch.device(args.device).type == "cpu":
            raise MoeError("--host-budget: on a CPU-only run there is no separate host tier; the expert budget "
                           "(--expert-budget) is the RAM cache above the disk")
    return kind, path


def preflight(args: argparse.Namespace, batch: int = 1) -> None:
    """Refuse bad offloading flags and a too-small budget (for a batch of ``batch`` prompts) from config.json
    alone, before loading weights."""
    if not offloading(args):
        return
    opts = options_from_args(OffloadOptions, args)
    inputs = [args.model, parse_expert_source(args.expert_source)[1], args.route_from_trace,
              args.popularity_trace, args.adapters]
    for flag, kind in (("--record-trace", "trace"), ("--timeline", "timeline")):
        path = getattr(args, flag[2:].replace("-", "_"))
        if path is not None:  # before the decode; never over an input (core/outputs.py's rule)
            check_output(path, flag, inputs=inputs, kind=kind, force=args.force)
    kind, packed = expert_source(args)
    if packed is not None:
        read_header(packed)  # a missing, foreign or truncated packed file is refused before loading
    cfg = load_config(args.model)
    dtype = checkpoint_dtype(args.model, args.dtype)
    layout = expert_format(cfg, getattr(args, "expert_dtype", "auto"), dtype)  # the experts' bytes, as loaded
    budget_slots(opts, n_layers=cfg.n_moe_layers, n_experts=cfg.n_experts, top_k=cfg.top_k,
                 expert_bytes=layout.nbytes, batch=batch)
    if kind == "disk" and torch.device(args.device).type != "cpu":
        host_slots(opts, n_layers=cfg.n_moe_layers, n_experts=cfg.n_experts, top_k=cfg.top_k,
                   expert_bytes=layout.nbytes, batch=batch)
    if batch > 1 and opts.predictor.startswith("recorded:"):
        raise MoeError(f"--predictor {opts.predictor} replays one sequence's recorded predictions; "
                       "give one prompt")


def checkpoint_dtype(model_dir, flag: str | None) -> torch.dtype:
    """The compute dtype: ``--dtype``, else config.json's, else the safetensors header's (no weight is read)."""
    named = read_json(Path(model_dir) / "config.json")
    named = named.get("torch_dtype") or named.get("dtype")
    dtype = parse_dtype(flag) or (DTYPES[named] if named in DTYPES else None)
    return dtype or SafetensorsReader(model_dir).dtype("model.embed_tokens.weight")


@dataclass
class OffloadRun:
    provider: OffloadedExperts
    model: SteppedModel
    recorder: TraceRecorder | None
    args: argparse.Namespace
    opts: OffloadOptions
    device: torch.device
    reads_from: str | None = None  # what the disk tier reads (the packed file, or the checkpoint's own files)

    @classmethod
    def build(cls, args: argparse.Namespace, model: Transformer, store: HostExpertStore,
              prompt_lens: int | list[int]) -> "OffloadRun | None":
        if not offloading(args):
            return None
        lens = [prompt_lens] if isinstance(prompt_lens, int) else list(prompt_lens)
        opts = options_from_args(OffloadOptions, args)
        L, E, K = store.n_moe_layers, store.n_experts, store.top_k
        n_slots = budget_slots(opts, n_layers=L, n_experts=E, top_k=K, expert_bytes=store.layout.nbytes,
                               batch=len(lens))
        forced = trace = None
        if args.route_from_trace:  # prompt b follows trace sequence --trace-seq + b
            trace = load_trace(args.route_from_trace)
            forced = ForcedRouting(trace, n_moe_layers=L, n_experts=E, top_k=K, seq=args.trace_seq,
                                   batch=len(lens))
            forced.check_length([n + args.max_new_tokens - 1 for n in lens])
        prefetching = opts.prefetching
        capacity = wave_capacity(n_slots=n_slots, scope=opts.scope, n_moe_layers=L, max_inflight=opts.max_inflight,
                                 prefetching=prefetching)  # a longer prompt's union comes in waves
        future = popularity = None
        if opts.eviction == "belady":
            if forced is None:
                raise MoeError("--eviction belady needs the future: give --route-from-trace FILE")
            future = forced.future(steps(lens, args.max_new_tokens), capacity)
        if opts.eviction == "static":
            if args.popularity_trace:
                hot = load_trace(args.popularity_trace)
                hot.check_model("--popularity-trace", n_layers=L, n_experts=E, top_k=K)
                popularity = popularity_from_trace(hot)
            elif forced is not None:
                popularity = forced.popularity()
            else:
                raise MoeError("--eviction static needs a popularity profile: give --popularity-trace FILE "
                               "or --route-from-trace FILE")
        adapters = None
        if args.adapters:
            from moe_runtime.predictors.calibrate import load_adapters_for  # checks shape and router weights
            adapters = load_adapters_for(model, args.adapters, opts.lookahead)
        # only recorded:NAME reads the forced trace; a prior from it would hand history/popularity the future
        predictor = make_predictor(opts.predictor, PredictorOptions(
            n_moe_layers=L, n_experts=E, top_k=K, lookahead=opts.lookahead, model=model, adapters=adapters,
            trace=trace if opts.predictor.startswith("recorded:") else None))
        if predictor.needs_future and forced is None:  # say so now, not mid-decode with copies in flight
            raise MoeError(f"--predictor {opts.predictor} needs the true routing: give --route-from-trace FILE")
        recorder = None
        if args.record_trace:
            recorder = TraceRecorder(TraceMeta(
                model=str(args.model), n_layers=L, n_experts=E, top_k=K, expert_bytes=store.layout.nbytes,
                dtype=store.layout.name, source="moe-runtime generate",
                extra={"predictor": opts.predictor, "lookahead": opts.lookahead}))
        record_preds = recorder is not None and prefetching and L > 1
        source = make_engine = pool = None
        kind, packed = expert_source(args)
        if kind == "disk":
            disk = disk_source(args.model, store, packed)
            reader = lambda n: DiskReadEngine(n, disk.paths, threads=args.read_depth,  # noqa: E731
                                              max_read=store.layout.nbytes, check_finite=not args.trust_weights)
            if torch.device(args.device).type == "cpu":  # two tiers: the RAM slot pool is the compute tier
                source, make_engine = disk.segments, lambda n, dev: reader(n)
                pool = aligned_pool(n_slots, store.layout.numel, store.layout.dtype)  # aligned for O_DIRECT
            else:  # three tiers: storage -> a host-RAM tier of --host-budget -> the GPU slots
                host = host_slots(opts, n_layers=L, n_experts=E, top_k=K, expert_bytes=store.layout.nbytes,
                                  batch=len(lens))
                source = lambda m, e: (m, e)  # noqa: E731  the tiered engine looks the expert up by key
                make_engine = three_tier_engine(reader, disk.segments, host, store.layout, pin=True)
        provider = OffloadedExperts(
            store, args.device, n_slots, policy=opts.eviction, scope=opts.scope, predictor=predictor,
            lookahead=opts.lookahead, prefetch_width=opts.prefetch_width, max_inflight=opts.max_inflight,
            future=future, popularity=popularity, timeline=args.timeline is not None,
            record_predictions=record_preds, pool=pool, source=source,
            **({"make_engine": make_engine} if make_engine else {}))
        stepped = SteppedModel(model, provider, forced=forced, recorder=recorder,
                               predictor_name=opts.predictor if record_preds else None, lookahead=opts.lookahead)
        return cls(provider, stepped, recorder, args, opts, torch.device(args.device),
                   disk.describe if kind == "disk" else None)

    def finish(self) -> dict:
        """Drain, write the trace and timeline if asked, and return the --json fields of the offloading run."""
        out = self.provider.finish()
        a, o = self.args, self.opts
        out.update(policy=o.eviction, cache_scope=o.scope, predictor=o.predictor, lookahead=o.lookahead,
                   expert_source=a.expert_source)
        if self.reads_from is not None:
            out["reads_from"] = self.reads_from
        if self.recorder is not None:
            self.recorder.save(a.record_trace)
        if a.timeline is not None:
            self.provider.write_timeline(a.timeline)
        gpu = gpu_telemetry(self.device)
        if gpu is not None:
            out["gpu"] = gpu
        return out
