"""The offloading flags of `moe-runtime generate`, defined once, and the run they configure.

Contract:

- ``add_arguments(parser)`` adds the offloading flags (budget, policy, scope,
  predictor, lookahead, prefetch width, in-flight cap, forced routing, static
  profile, adapters, trace recording, timeline).
- ``preflight(args)`` reads only config.json (and, when it names no dtype, the
  safetensors header) and refuses a budget below the minimum (one layer's top-k experts
  plus the in-flight slots; times the layers with per-layer scope) before any
  weight is loaded.
- ``OffloadRun.build(args, model, store, prompt_len)`` returns None when no
  offloading flag is given (all experts resident, the reference) and otherwise
  the provider and the wrapped model to pass to ``generate()``; ``finish()``
  drains the copies, writes the recorded trace and the timeline, and returns
  the fields ``--json`` adds (see README).
- On CPU, ``build`` leaves one core to the copy thread (``torch.set_num_threads``).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_runtime.cache.budget import check_budget, parse_budget
from moe_runtime.model.checkpoint import DTYPES, SafetensorsReader, parse_dtype
from moe_runtime.model.config import load_config, read_json
from moe_runtime.errors import MoeError
from moe_runtime.model.experts import ExpertLayout, HostExpertStore
from moe_runtime.offload.forced_routing import ForcedRouting, popularity_from_trace
from moe_runtime.model.transformer import Transformer
from moe_runtime.offload.provider import OffloadedExperts
from moe_runtime.offload.steps import SteppedModel, prefill_chunk, steps
from moe_runtime.cache.policies import EVICTION_POLICIES
from moe_runtime.predictors import PREDICTORS, PredictorOptions, make_predictor
from moe_runtime.offload.telemetry import gpu_telemetry
from moe_runtime.traces import TraceMeta, TraceRecorder, load_trace

_DEFAULTS: dict[str, object] = {}  # dest -> default of every offloading flag, filled by add_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("offloading (any of these turns it on; without them every expert is resident)")
    g.add_argument("--budget", help="device expert cache: bytes (4GiB), share of all experts (25%%) or a count "
                                    "of experts (48); default 100%% when another offloading flag is given")
    g.add_argument("--policy", default="lru", choices=list(EVICTION_POLICIES), help="eviction policy (default lru)")
    g.add_argument("--cache-scope", default="global", choices=["global", "per-layer"],
                   help="one pool for all layers, or an equal share per layer (default global)")
    names = ", ".join(n for n in PREDICTORS if n != "recorded")
    g.add_argument("--predictor", default="none", help=f"prefetch predictor: {names} or recorded:NAME (default none)")
    g.add_argument("--lookahead", type=int, default=1, help="predict layers l+1..l+D (default 1)")
    g.add_argument("--prefetch-width", type=int, default=None, help="experts prefetched per layer (default top-k)")
    g.add_argument("--max-inflight", type=int, default=4, help="prefetches in flight at once (default 4)")
    g.add_argument("--route-from-trace", metavar="FILE", help="force each layer's routing from a trace (.npz)")
    g.add_argument("--trace-seq", type=int, default=0, help="which sequence of that trace (default 0)")
    g.add_argument("--popularity-trace", metavar="FILE", help="trace giving the 'static' policy's hot set")
    g.add_argument("--adapters", metavar="FILE", help="aligned adapters for --predictor aligned")
    g.add_argument("--record-trace", metavar="FILE", help="record the routing (and predictions) to a trace")
    g.add_argument("--timeline", metavar="FILE", help="write a Perfetto/Chrome timeline JSON")
    _DEFAULTS.update({a.dest: a.default for a in g._group_actions})


def offloading(args: argparse.Namespace) -> bool:
    """True when any offloading flag differs from its default."""
    return any(getattr(args, dest, default) != default for dest, default in _DEFAULTS.items())


def _check_ints(args: argparse.Namespace) -> None:
    if args.lookahead < 1:
        raise MoeError(f"--lookahead must be at least 1, got {args.lookahead}")
    if args.max_inflight < 1:
        raise MoeError(f"--max-inflight must be at least 1, got {args.max_inflight}")
    if args.prefetch_width is not None and args.prefetch_width < 1:
        raise MoeError(f"--prefetch-width must be at least 1, got {args.prefetch_width}")


def budget_slots(args: argparse.Namespace, *, n_layers: int, n_experts: int, top_k: int, expert_bytes: int) -> int:
    """Slots the budget buys, checked against the minimum (MoeError naming it in bytes and experts)."""
    n = parse_budget(args.budget or "100%", expert_bytes=expert_bytes, total_experts=n_layers * n_experts)
    check_budget(n, experts_per_layer=top_k, max_inflight=args.max_inflight, prefetching=args.predictor != "none",
                 scope=args.cache_scope, n_layers=n_layers, expert_bytes=expert_bytes)
    return n


def preflight(args: argparse.Namespace) -> None:
    """Refuse bad offloading flags and a too-small budget from config.json alone, before loading weights."""
    if not offloading(args):
        return
    _check_ints(args)
    cfg = load_config(args.model)
    named = read_json(Path(args.model) / "config.json")
    named = named.get("torch_dtype") or named.get("dtype")
    dtype = parse_dtype(args.dtype) or (DTYPES[named] if named in DTYPES else None)
    if dtype is None:  # no dtype in config.json: the safetensors header says (no weight is read)
        dtype = SafetensorsReader(args.model).dtype("model.embed_tokens.weight")
    layout = ExpertLayout(cfg.hidden_size, cfg.moe_intermediate_size, dtype)
    budget_slots(args, n_layers=cfg.n_moe_layers, n_experts=cfg.n_experts, top_k=cfg.top_k,
                 expert_bytes=layout.nbytes)


@dataclass
class OffloadRun:
    provider: OffloadedExperts
    model: SteppedModel
    recorder: TraceRecorder | None
    args: argparse.Namespace
    device: torch.device

    @classmethod
    def build(cls, args: argparse.Namespace, model: Transformer, store: HostExpertStore,
              prompt_len: int) -> "OffloadRun | None":
        if not offloading(args):
            return None
        _check_ints(args)
        if torch.device(args.device).type == "cpu":
            # the copy thread needs a core of its own: compute threads spinning on every core starve it
            torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
        L, E, K = store.n_layers, store.n_experts, store.top_k
        n_slots = budget_slots(args, n_layers=L, n_experts=E, top_k=K, expert_bytes=store.layout.nbytes)
        forced = trace = None
        if args.route_from_trace:
            trace = load_trace(args.route_from_trace)
            forced = ForcedRouting(trace, n_layers=L, n_experts=E, top_k=K, seq=args.trace_seq)
            forced.check_length(prompt_len + args.max_new_tokens - 1)
        prefetching = args.predictor != "none"
        pool = n_slots if args.cache_scope == "global" else n_slots // L
        chunk = prefill_chunk(prompt_len=prompt_len, pool_slots=pool, n_experts=E, top_k=K,
                              inflight=args.max_inflight if prefetching else 0)
        future = popularity = None
        if args.policy == "belady":
            if forced is None:
                raise MoeError("--policy belady needs the future: give --route-from-trace FILE")
            future = forced.future(steps(prompt_len, args.max_new_tokens, chunk))
        if args.policy == "static":
            if args.popularity_trace:
                popularity = popularity_from_trace(load_trace(args.popularity_trace))
            elif forced is not None:
                popularity = forced.popularity()
            else:
                raise MoeError("--policy static needs a popularity profile: give --popularity-trace FILE "
                               "or --route-from-trace FILE")
        adapters = None
        if args.adapters:
            from moe_runtime.predictors.calibrate import load_adapters_for  # checks shape and router weights
            adapters = load_adapters_for(model, args.adapters, args.lookahead)
        # only recorded:NAME reads the forced trace; a prior from it would hand history/popularity the future
        predictor = make_predictor(args.predictor, PredictorOptions(
            n_layers=L, n_experts=E, top_k=K, lookahead=args.lookahead, model=model, adapters=adapters,
            trace=trace if args.predictor.startswith("recorded:") else None))
        if predictor.needs_future and forced is None:  # say so now, not mid-decode with copies in flight
            raise MoeError(f"--predictor {args.predictor} needs the true routing: give --route-from-trace FILE")
        recorder = None
        if args.record_trace:
            recorder = TraceRecorder(TraceMeta(
                model=str(args.model), n_layers=L, n_experts=E, top_k=K, expert_bytes=store.layout.nbytes,
                dtype=str(store.layout.dtype).removeprefix("torch."), source="moe-runtime generate",
                extra={"predictor": args.predictor, "lookahead": args.lookahead}))
        record_preds = recorder is not None and args.predictor != "none" and L > 1
        provider = OffloadedExperts(
            store, args.device, n_slots, policy=args.policy, scope=args.cache_scope, predictor=predictor,
            lookahead=args.lookahead, prefetch_width=args.prefetch_width, max_inflight=args.max_inflight,
            future=future, popularity=popularity, timeline=args.timeline is not None,
            record_predictions=record_preds)
        stepped = SteppedModel(model, provider, chunk=chunk, forced=forced, recorder=recorder,
                               predictor_name=args.predictor if record_preds else None, lookahead=args.lookahead)
        return cls(provider, stepped, recorder, args, torch.device(args.device))

    def finish(self) -> dict:
        """Drain, write the trace and timeline if asked, and return the --json fields of the offloading run."""
        out = self.provider.finish()
        a = self.args
        out.update(policy=a.policy, cache_scope=a.cache_scope, predictor=a.predictor, lookahead=a.lookahead,
                   prefill_chunk=self.model.chunk)
        if self.recorder is not None:
            self.recorder.save(a.record_trace)
        if a.timeline is not None:
            self.provider.write_timeline(a.timeline)
        gpu = gpu_telemetry(self.device)
        if gpu is not None:
            out["gpu"] = gpu
        return out
