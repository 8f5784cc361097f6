"""Assembling an offloaded run: the one function every caller uses (the CLI, the benchmarks, profile,
calibration and the server).

Contract:

- ``ExecutorOptions`` holds the executor's own settings (storage reads in
  flight, forced routing, the static policy's popularity trace, adapters,
  recording, the timeline), defined once with ``option(...)`` fields as
  ``OffloadOptions`` is, so their flags come from ``core/flags.py`` too.
  Fields without a flag (``chunk``, ``record``, ``check_finite``) are for
  library callers.
- ``preflight(model_dir, opts, xopts, ...)`` reads only config.json (and, when
  it names no dtype, the safetensors header) and refuses bad settings and a
  budget below the minimum before any weight is loaded.
- ``build_run(model, store, opts, xopts, ...)`` returns a ``Run``: the expert
  provider (``ResidentExperts`` when ``opts`` is None: the all-resident
  reference; else ``OffloadedExperts`` with its engines, tiers and predictor)
  and the model to pass to ``generate()``. ``Run.finish()`` drains the copies,
  writes the recorded trace and the timeline, and returns the report fields;
  ``Run.close()`` stops the copy engine after an error.

This module does not parse command lines and prints nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from moe_runtime.core.budget import BudgetFit, fit_budget, layer_demand, parse_budget
from moe_runtime.core.config_files import short
from moe_runtime.core.errors import MoeError
from moe_runtime.core.flags import integer
from moe_runtime.core.model_config import load_config
from moe_runtime.core.format_sizes import EXPERT_DTYPES, PLAIN
from moe_runtime.core.host_profile import load_host
from moe_runtime.core.options import DEFAULT_BUDGET, HybridOptions, OffloadOptions, option, parse_expert_source
from moe_runtime.core.outputs import check_output
from moe_runtime.model.checkpoint import checkpoint_dtype, expert_format
from moe_runtime.model.device import check_fits
from moe_runtime.model.formats import TORCH
from moe_runtime.model.experts import HostExpertStore, ResidentExperts
from moe_runtime.model.transformer import Transformer
from moe_runtime.model.host_experts import host_threads
from moe_runtime.offload.forced_routing import ForcedRouting, popularity_from_trace
from moe_runtime.offload.host_costs import host_costs
from moe_runtime.offload.packed import read_header
from moe_runtime.offload.provider import OffloadedExperts
from moe_runtime.offload.steps import SteppedModel, steps
from moe_runtime.offload.storage import DiskReadEngine, aligned_pool
from moe_runtime.offload.telemetry import gpu_telemetry
from moe_runtime.offload.tiered import host_tier_minimum, three_tier_engine
from moe_runtime.offload.tiers import disk_source
from moe_runtime.predictors import PredictorOptions, make_predictor
from moe_runtime.traces import TraceMeta, TraceRecorder, load_trace


HOST_DTYPES = tuple(d for d in EXPERT_DTYPES if d != "auto")  # the second host copy's formats (--host-dtype)


@dataclass(frozen=True)
class ExecutorOptions(HybridOptions):
    """The executor's settings beside the shared ``OffloadOptions`` (flags: the fields with one): the hybrid
    options the simulator shares (``HybridOptions``: miss policy, host layers, host profile) and its own."""

    read_depth: int = option(4, "--read-depth", type=integer(1, 1024), metavar="N",
                             help="reads from storage in flight at once")
    route_from_trace: str | None = option(None, "--route-from-trace", metavar="FILE",
                                          help="force each layer's routing from a trace (.npz)")
    trace_seq: int = option(0, "--trace-seq", type=integer(0), metavar="N", help="which sequence of that trace")
    popularity_trace: str | None = option(None, "--popularity-trace", metavar="FILE",
                                          help="trace giving the 'static' policy's hot set")
    adapters: str | None = option(None, "--adapters", metavar="FILE", help="aligned adapters for --predictor aligned")
    record_trace: str | None = option(None, "--record-trace", metavar="FILE",
                                      help="record the routing (and predictions) to a trace")
    timeline: str | None = option(None, "--timeline", metavar="FILE", help="write a Perfetto/Chrome timeline JSON")
    host_dtype: str | None = option(None, "--host-dtype", choices=lambda: list(HOST_DTYPES),
                                    help="keep a second host copy of every expert in this format and compute the "
                                         "host's experts from it (int8/int4 read fewer bytes; tokens then carry its "
                                         "rounding); default: the host computes from the experts' own host copy")
    host_threads: int | None = option(None, "--host-threads", type=integer(1, 4096), metavar="N",
                                      help="threads the host computes its experts with (default: torch's; on a "
                                           "CPU-only run every computation uses them)")
    chunk: int | None = None  # prefill in forwards of at most this many tokens (None: one forward)
    record: bool = False  # keep the routing in memory (``Run.recorder``) even without --record-trace
    check_finite: bool = True  # check experts read from disk for NaN/inf at their first read
    config_file: str | None = None  # the --config file the options came from: an input, never an output
    force: bool = False  # --force: replace an output file that is not an earlier output of its kind (no option():
    # an option field would turn offloading on, cli/offload.py)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.host_dtype is not None and self.host_dtype not in HOST_DTYPES:
            raise MoeError(f"--host-dtype must be one of {', '.join(HOST_DTYPES)}, got {short(self.host_dtype)} "
                           "(mxfp4 is only a checkpoint's own format; leave --host-dtype out to compute from it)")

    @property
    def outputs(self) -> list[tuple[str, str, str]]:
        """(path, flag, output kind of core/outputs.py) of every file the run writes."""
        return [(p, f, k) for p, f, k in ((self.record_trace, "--record-trace", "trace"),
                                          (self.timeline, "--timeline", "timeline")) if p]


def budget_slots(opts: OffloadOptions, *, n_layers: int, n_experts: int, top_k: int, expert_bytes: int,
                 batch: int = 1) -> BudgetFit:
    """The slots the budget buys, fitted to a batch of ``batch`` prompts by core/budget.py's rule (the
    prefetch depth shrinks, then unions come in waves; MoeError only below one token's top-k)."""
    opts.check_model(n_layers)
    n = parse_budget(opts.budget or DEFAULT_BUDGET["generate"], expert_bytes=expert_bytes,
                     total_experts=n_layers * n_experts)
    return fit_budget(n, top_k=top_k, batch=batch, n_experts=n_experts, max_inflight=opts.max_inflight,
                      prefetching=opts.prefetching, scope=opts.scope, n_moe_layers=n_layers,
                      expert_bytes=expert_bytes)


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


def check_source(opts: OffloadOptions | None, device) -> tuple[str, str | None]:
    """(kind, packed file) of the expert source, checked against the tiers the device allows."""
    if opts is None:
        return "memory", None
    kind, path = parse_expert_source(opts.expert_source)
    if opts.host_budget is not None and torch.device(device).type == "cpu":
        raise MoeError("--host-budget: on a CPU-only run there is no separate host tier; the expert budget "
                       "(--expert-budget) is the RAM cache above the disk")
    return kind, path


def preflight(model_dir, opts: OffloadOptions | None, xopts: ExecutorOptions, *, device, dtype: str | None = None,
              expert_dtype: str = "auto", batch: int = 1) -> None:
    """Refuse bad settings and a too-small budget (for a batch of ``batch`` prompts) from config.json alone,
    before loading weights. ``opts`` None: the all-resident run (nothing to check)."""
    if opts is None:
        return
    inputs = [model_dir, parse_expert_source(opts.expert_source)[1], xopts.route_from_trace, xopts.popularity_trace,
              xopts.adapters, xopts.host_profile, xopts.config_file]  # an output never replaces one (even with
    # --force), nor another kind of file without --force; a host profile's name matches no path
    for path, flag, kind in xopts.outputs:  # before the decode: text that took minutes is not thrown away at the end
        check_output(path, flag, inputs=inputs, kind=kind, force=xopts.force)
    kind, packed = check_source(opts, device)
    if packed is not None:
        read_header(packed)  # a missing, foreign or truncated packed file is refused before loading
    cfg = load_config(model_dir)
    layout = expert_format(cfg, expert_dtype, checkpoint_dtype(model_dir, dtype))  # the experts' bytes, as loaded
    shape = dict(n_layers=cfg.n_moe_layers, n_experts=cfg.n_experts, top_k=cfg.top_k, expert_bytes=layout.nbytes,
                 batch=batch)
    budget_slots(opts, **shape)
    xopts.host_layer_set(cfg.n_moe_layers)  # --n-host-layers past the model's MoE layers is refused
    if xopts.computes_on_host:
        xopts.for_source(kind)  # host compute with experts on disk is refused
        host_layout = layout if xopts.host_dtype is None else host_format(cfg, xopts.host_dtype, layout)
        if xopts.host_profile is not None:  # a bad profile is refused before loading
            load_host(xopts.host_profile).format_of(host_layout.codec)
        if xopts.host_dtype is not None:
            check_fits(f"a second host copy of every expert in {xopts.host_dtype} (--host-dtype)",
                       cfg.n_moe_layers * cfg.n_experts * host_layout.nbytes, "cpu")
    elif xopts.host_dtype is not None:
        raise MoeError("--host-dtype is the format the host computes its experts from: give --miss-policy host "
                       "or auto, or host layers")
    if kind == "disk" and torch.device(device).type != "cpu":
        host_slots(opts, **shape)
    if batch > 1 and opts.predictor.startswith("recorded:"):
        raise MoeError(f"--predictor {opts.predictor} replays one sequence's recorded predictions; "
                       "give one prompt")


@dataclass
class Run:
    """An assembled run: pass ``model`` and ``provider`` to ``generate()``, then call ``finish()``."""

    provider: ResidentExperts | OffloadedExperts
    model: Transformer | SteppedModel
    opts: OffloadOptions | None = None
    xopts: ExecutorOptions = field(default_factory=ExecutorOptions)
    recorder: TraceRecorder | None = None
    reads_from: str | None = None  # what the disk tier reads (the packed file, or the checkpoint's own files)
    miss_costs: str | None = None  # hybrid runs: where the cost rule's figures came from (host_costs.py)

    @property
    def offloaded(self) -> bool:
        return self.opts is not None

    def close(self) -> None:
        """Stop the copy engine (after an error: a copy thread left running can abort the interpreter)."""
        if self.offloaded:
            self.provider.engine.close()

    def finish(self) -> dict:
        """Drain, write the trace and timeline if asked, and return the report fields ({} when resident)."""
        if not self.offloaded:
            return {}
        out = self.provider.finish()
        o, x = self.opts, self.xopts
        out.update(policy=o.eviction, cache_scope=o.scope, predictor=o.predictor, lookahead=o.lookahead,
                   expert_source=o.expert_source,
                   max_inflight=self.provider.cache.max_inflight)  # as fitted to the budget (core/budget.py)
        if self.reads_from is not None:
            out["reads_from"] = self.reads_from
        if self.miss_costs is not None:
            out["miss_costs"] = self.miss_costs
        if self.recorder is not None and x.record_trace:
            self.recorder.save(x.record_trace)
        if x.timeline is not None:
            self.provider.write_timeline(x.timeline)
        gpu = gpu_telemetry(self.provider.device)
        if gpu is not None:
            out["gpu"] = gpu
        return out


def build_run(model: Transformer, store: HostExpertStore, opts: OffloadOptions | None,
              xopts: ExecutorOptions | None = None, *, device=None, model_dir=None,
              prompt_lens: int | list[int] = 1, max_new_tokens: int = 1, forced: ForcedRouting | None = None,
              passes: int = 1, pool=None, make_engine: Callable | None = None, source: Callable | None = None,
              predictor_extra: dict | None = None) -> Run:
    """Assemble the run for ``prompt_lens`` prompts decoding ``max_new_tokens`` each (``passes`` times: the
    length of Belady's future). ``opts`` None: every expert resident. ``forced`` replaces
    ``--route-from-trace`` with routing already loaded; ``pool`` lends the slot pool (a benchmark reusing it);
    ``make_engine(n_slots, device)`` and ``source(layer, expert)`` replace the copy engine and what it copies
    from (tests, and benchmarks reading a packed file of a synthetic model); ``predictor_extra``: more
    ``PredictorOptions`` fields (noisy-oracle's recall)."""
    xopts = xopts or ExecutorOptions()
    device = torch.device(device if device is not None else model.device)
    lens = [prompt_lens] if isinstance(prompt_lens, int) else list(prompt_lens)
    L, E, K = store.n_moe_layers, store.n_experts, store.top_k
    if forced is None and xopts.route_from_trace:  # prompt b follows trace sequence --trace-seq + b
        forced = ForcedRouting(load_trace(xopts.route_from_trace), n_moe_layers=L, n_experts=E, top_k=K,
                               seq=xopts.trace_seq, batch=len(lens))
        forced.check_length([n + max_new_tokens - 1 for n in lens])
    if opts is None:  # the reference: every expert resident (following the forced routing, if any)
        resident = ResidentExperts(store, device)
        plain = forced is None and xopts.chunk is None
        return Run(resident, model if plain else SteppedModel(model, resident, chunk=xopts.chunk, forced=forced),
                   xopts=xopts)
    fit = budget_slots(opts, n_layers=L, n_experts=E, top_k=K, expert_bytes=store.layout.nbytes, batch=len(lens))
    n_slots = fit.n_slots
    trace = forced.trace if forced is not None else None
    capacity = fit.capacity  # a larger union (a long prompt's, a batch's beyond the pool) comes in waves
    future = None
    if opts.eviction == "belady":
        if forced is None:
            raise MoeError("--eviction belady needs the future: give --route-from-trace FILE")
        future = forced.future(steps(lens, max_new_tokens, xopts.chunk) * passes, capacity)
    popularity = _popularity(opts, xopts, forced, L, E, K)
    adapters = None
    if xopts.adapters:
        from moe_runtime.predictors.calibrate import load_adapters_for  # checks shape and router weights
        adapters = load_adapters_for(model, xopts.adapters, opts.lookahead)
    # only recorded:NAME reads the forced trace; a prior from it would hand history/popularity the future
    predictor = make_predictor(opts.predictor, PredictorOptions(
        n_moe_layers=L, n_experts=E, top_k=K, lookahead=opts.lookahead, model=model, adapters=adapters,
        trace=trace if opts.predictor.startswith("recorded:") else None, **(predictor_extra or {})))
    if predictor.needs_future and forced is None:  # say so now, not mid-decode with copies in flight
        raise MoeError(f"--predictor {opts.predictor} needs the true routing: give --route-from-trace FILE")
    recorder = None
    if xopts.record_trace or xopts.record:
        recorder = TraceRecorder(TraceMeta(
            model=str(model_dir or model.cfg.model_type), n_layers=L, n_experts=E, top_k=K,
            expert_bytes=store.layout.nbytes, dtype=store.layout.name, source="moe-runtime generate",
            extra={"predictor": opts.predictor, "lookahead": opts.lookahead}))
    record_preds = recorder is not None and opts.prefetching and L > 1
    tier_source, engine, reads_from = _tiers(opts, xopts, store, model_dir, device, n_slots, len(lens))
    if engine is not None:
        (make_engine, pool), source = engine, tier_source
    host_layers, costs, miss_costs = xopts.host_layer_set(L), None, None
    host_store = None
    if xopts.computes_on_host:
        host_threads(xopts.host_threads)
        if xopts.host_dtype is not None and xopts.host_dtype != store.layout.codec:
            host_store = store.converted(host_format(model.cfg, xopts.host_dtype, store.layout))
        costs, miss_costs = host_costs(store, device, xopts.host_profile, host_store)
    provider = OffloadedExperts(
        store, device, n_slots, policy=opts.eviction, scope=opts.scope, predictor=predictor,
        prefetch_width=opts.prefetch_width, max_inflight=fit.inflight, future=future,
        popularity=popularity, timeline=xopts.timeline is not None, record_predictions=record_preds,
        pool=pool, source=source, miss_policy=xopts.policy, host_cost=costs, host_layers=host_layers,
        host_store=host_store,
        **({"make_engine": make_engine} if make_engine else {}))
    stepped = SteppedModel(model, provider, chunk=xopts.chunk, forced=forced, recorder=recorder,
                           predictor_name=opts.predictor if record_preds else None, lookahead=opts.lookahead)
    return Run(provider, stepped, opts, xopts, recorder, reads_from, miss_costs)


def host_format(cfg, host_dtype: str, layout):
    """The format of ``--host-dtype`` copies: a float format computes in its own dtype (no conversion per
    call), a quantized one in the model's compute dtype."""
    return expert_format(cfg, host_dtype, TORCH[host_dtype] if host_dtype in PLAIN else layout.compute_dtype)


def _popularity(opts: OffloadOptions, xopts: ExecutorOptions, forced: ForcedRouting | None, L: int, E: int,
                K: int):
    """The static policy's hot set: from --popularity-trace, else the forced routing's counts."""
    if opts.eviction != "static":
        return forced.popularity() if forced is not None else None
    if xopts.popularity_trace:
        hot = load_trace(xopts.popularity_trace)
        hot.check_model("--popularity-trace", n_layers=L, n_experts=E, top_k=K)
        return popularity_from_trace(hot)
    if forced is not None:
        return forced.popularity()
    raise MoeError("--eviction static needs a popularity profile: give --popularity-trace FILE "
                   "or --route-from-trace FILE")


def _tiers(opts: OffloadOptions, xopts: ExecutorOptions, store: HostExpertStore, model_dir, device: torch.device,
           n_slots: int, batch: int):
    """(copy source, (make_engine, pool) or None, what the disk tier reads) for the expert source."""
    kind, packed = check_source(opts, device)
    if kind == "memory":
        return None, None, None
    if model_dir is None:
        raise MoeError("--expert-source disk needs the checkpoint directory the experts are read from")
    disk = disk_source(model_dir, store, packed)

    def reader(n: int) -> DiskReadEngine:
        return DiskReadEngine(n, disk.paths, threads=xopts.read_depth, max_read=store.layout.nbytes,
                              check_finite=xopts.check_finite)
    if device.type == "cpu":  # two tiers: the RAM slot pool is the compute tier
        pool = aligned_pool(n_slots, store.layout.numel, store.layout.dtype)  # aligned for O_DIRECT
        return disk.segments, (lambda n, dev: reader(n), pool), disk.describe
    # three tiers: storage -> a host-RAM tier of --host-budget -> the GPU slots
    host = host_slots(opts, n_layers=store.n_moe_layers, n_experts=store.n_experts, top_k=store.top_k,
                      expert_bytes=store.layout.nbytes, batch=batch)
    engine = three_tier_engine(reader, disk.segments, host, store.layout, pin=True)
    return (lambda m, e: (m, e)), (engine, None), disk.describe  # the tiered engine looks experts up by key


def load_run(model_dir, opts: OffloadOptions | None, xopts: ExecutorOptions | None = None, *, device="cpu",
             dtype: str | None = None, expert_dtype: str = "auto", prompt_lens: int | list[int] = 1,
             max_new_tokens: int = 1) -> Run:
    """``preflight``, load the checkpoint (no experts when they stay on disk) and ``build_run``."""
    from moe_runtime.model.checkpoint import load_model, parse_dtype

    xopts = xopts or ExecutorOptions()
    lens = [prompt_lens] if isinstance(prompt_lens, int) else list(prompt_lens)
    preflight(model_dir, opts, xopts, device=device, dtype=dtype, expert_dtype=expert_dtype, batch=len(lens))
    on_disk = check_source(opts, device)[0] == "disk"  # experts stay on storage: the store holds none
    model, store = load_model(model_dir, device, parse_dtype(dtype), load_experts=not on_disk,
                              expert_dtype=expert_dtype, check_finite=xopts.check_finite)
    return build_run(model, store, opts, xopts, device=device, model_dir=model_dir, prompt_lens=lens,
                     max_new_tokens=max_new_tokens)
