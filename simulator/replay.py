"""Replay a routing trace on a modelled device with simpy, and report hits, stalls and tokens/s.

Contract (DESIGN.md's semantics, the runtime's own decisions):
- A *step* is one forward pass over B tokens, one from each of B sequences
  decoded together (continuous batching: a lane that finishes its sequence
  takes the next one in trace order; ``workload.py``). B=1 replays the trace
  token by token. Every token is replayed as a decode step, whatever its
  recorded phase.
- A layer of a step needs the union of its tokens' experts, in order of first
  appearance (token-major, then rank). What happens at a layer is decided by
  the runtime's ``LayerProtocol`` (classify and pin -> withdraw stale queued
  prefetches -> demand copies ahead of every queued prefetch, promoting late
  queued ones -> predict and admit prefetches), exactly as in the executor;
  this module then waits for the layer's misses and late prefetches (stall),
  computes (``env.timeout(cost)``) and unpins. After the last layer: the
  step's dense layers and output head (cost model ``overhead``), and the
  predictor learns from the step. The cache starts empty (cold).
- When copies finish is the copy model's business (``copies.py``): computed
  copy engines by default (``analytic``: per engine the next free time, a
  queue of prefetches, finish times the compute waits on), the simpy
  process-per-copy engines they are tested equal to (``event``), or the
  lockstep rule of the differential test.
- total_s = compute_s + stall_s + interference_s. With no prefetch and one engine every stall is
  whole demand copies, so total_s = compute_s + misses x (bytes/bw + latency). interference_s is the
  compute stretched while copies run, on a device with ``copy_slowdown`` (a CPU, whose copy thread
  shares the compute's cores; 0 elsewhere): a layer (or a step's dense part) of cost c starting at t
  with the engines busy until b runs at 1/(1+s) of its speed until b (analytic copies only).

Time: the compute's instant ``t`` is one float summed layer by layer (a stall
sets it to the finish time it waited for), the same operations in the same
order under every copy model, so the models' times are the same floats and
their ties the same ties. simpy stays the clock: the compute yields
(``wake_at(t)``) only when a copy event falls at or before its next access,
and once at the end; with analytic copies there are no copy events, so hits
and misses alike create no simpy events.

Bounds (``bounds``): all-resident time = compute time with no copies; best
possible = max(all-resident time, Belady's miss bytes / aggregate copy
bandwidth): Belady eviction with a perfect prefetcher limited only by bandwidth
(no latency, copies fully overlapped), computed, not simulated; the Belady
count is cached by (trace digest, slots, scope, tokens, batch) in the process
and, given a ``BoundsCache``, on disk.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import simpy

from moe_runtime.core.budget import check_budget, layer_demand, parse_budget, parse_bytes
from moe_runtime.core.expert_cache import ExpertCache, Outcome, access_sequence
from moe_runtime.core.host_profile import FORMATS, load_host
from moe_runtime.core.host_tier import host_tier_minimum
from moe_runtime.core.memory import memory_plan
from moe_runtime.core.options import (DEFAULT_HOST_PROFILE)
from moe_runtime.core.policies import EVICTION_POLICIES, popularity_counts
from moe_runtime.core.protocol import HostCost, LayerProtocol
from moe_runtime.core.errors import MoeError
from moe_runtime.core.predictors import PredictorOptions, make_predictor
from moe_runtime.core.timeline import Timeline
from moe_runtime.traces import PHASE_DECODE

from .bounds import BoundsCache, bounds, hybrid_floor, trace_digest
from .copies import AnalyticCopies, EventCopies, LockstepCopies, wake_at
from .tiers import HostTier
from .cost_model import CostModel, StepCosts
from .replay_options import ReplayOptions  # noqa: F401  (re-exported: the replay's options)
from .workload import Workload, build_workload, load_inputs  # noqa: F401  (load_inputs: re-exported)


class Replay:
    """One simulation of ``workload`` on ``cost``'s device; ``run()`` returns the report dict."""

    def __init__(self, trace, cost: CostModel, opts: ReplayOptions, *, workload: Workload | None = None,
                 timeline: Timeline | None = None, fast: bool = True, copies: str = "analytic",
                 lockstep_per_layer: int | None = None, bounds_cache: BoundsCache | None = None,
                 fit_check: bool = False) -> None:
        """``copies``: ``analytic`` (computed copy times, the default), ``event`` (a simpy process per
        copy: the reference the analytic model is tested against) or ``lockstep`` (copies complete by
        rule, for the differential test against the executor's LockstepEngine; ``lockstep_per_layer``
        prefetches complete per layer, None: all). ``bounds_cache``: where the Belady count is kept
        on disk across runs (None: computed here, memoised only in this process). ``fit_check``: refuse
        (``DoesNotFit``) a budget that does not fit in the device's memory beside the dense weights, the KV
        cache and the workspace (``moe-sim replay`` and sweeps; off for code that replays any budget)."""
        if copies not in ("analytic", "event", "lockstep"):
            raise ValueError(f"copies must be analytic, event or lockstep, not {copies!r}")
        if opts.expert_dtype is not None:  # the same model with its experts stored otherwise
            cost = CostModel(cost.spec.with_expert_dtype(opts.expert_dtype), cost.device)
        self.trace, self.cost, self.opts, self.timeline, self.fast = trace, cost, opts, timeline, fast
        self.copy_model, self.lockstep_per_layer, self.bounds_cache = copies, lockstep_per_layer, bounds_cache
        spec, dev = cost.spec, cost.device
        if workload is None and opts.tokens is not None and opts.tokens < trace.n_tokens:
            self.trace = trace = trace.slice(0, opts.tokens)
        self._own_workload = workload is None or workload.n_tokens.sum() == trace.n_tokens
        self.w = workload or build_workload(trace, opts.batch)
        self.costs: StepCosts = cost.step_costs(self.w.n_tokens, self.w.ctx_sum, self.w.n_unique)
        self.resident_s = self.costs.total  # the all-resident bound: no predictor, no copies
        # host time the executor spends that copies and layer compute do not show (profiled; 0 by default):
        # prediction and prefetch planning at every layer, and per layer that waits on copies, the
        # offloading bookkeeping of its misses and the copy thread's hand-off
        pred_s = dev.predictor_seconds(opts.predictor, opts.lookahead) if opts.prefetching else 0.0
        if pred_s:
            self.costs = StepCosts(self.costs.layer + pred_s, self.costs.overhead)
        self.wait_s = (dev.host_layer_us + dev.demand_us) * 1e-6
        self.slowdown = dev.copy_slowdown
        if self.slowdown and copies != "analytic":
            raise MoeError(f"{dev.name}'s copy_slowdown (compute slowed while copies run) is modelled by the "
                           "analytic copies only")
        L, E = trace.n_layers, trace.n_experts
        self.expert_bytes = spec.expert_bytes
        self.memory = memory_plan(spec, device_name=dev.name, device_bytes=dev.memory_bytes, context=opts.context,
                                  batch=opts.batch, workspace_bytes=parse_bytes(opts.workspace, "--workspace"))
        self.n_slots = parse_budget(opts.budget, expert_bytes=self.expert_bytes, total_experts=L * E,
                                    free_bytes=self.memory.free_for_experts)
        if fit_check:
            self.memory.check(self.n_slots * self.expert_bytes, opts.budget)
        self.epl = layer_demand(top_k=trace.top_k, batch=opts.batch, n_experts=E)
        opts.check_model(L)
        check_budget(self.n_slots, experts_per_layer=self.epl, max_inflight=opts.max_inflight,
                     prefetching=opts.prefetching, scope=opts.scope, n_moe_layers=L, expert_bytes=self.expert_bytes)
        self.copy_s = dev.copy_seconds(self.expert_bytes)
        # tiers (tiers.py): experts on disk feed the device cache directly (two tiers) or through a host tier
        self.disk, self.host_slots = opts.source_kind == "disk", None
        self.link_engines, self.link_s, self.link_idle_s = dev.copy_engines, self.copy_s, 0.0
        if self.disk:
            opts.for_source("disk")  # host compute reads the host copies: refused with experts on disk, as in the executor
            if not dev.has_storage:
                raise MoeError(f"--expert-source disk needs the device profile's storage link; {dev.name} has "
                               "none (read_bandwidth_gbps, read_latency_us, read_queue_depth: `moe-runtime "
                               "profile --expert-source disk` measures them)")
            self.read_s = dev.read_seconds(self.expert_bytes)
            if opts.host_budget is None:
                # one reader at the aggregate rate (the depth is folded into it); a read queued behind
                # another is pipelined with it, so only a read that starts the idle disk pays the latency
                self.link_engines, self.link_idle_s = 1, dev.read_latency_us * 1e-6
                self.link_s = self.expert_bytes / (dev.read_bandwidth_gbps * 1e9)
            else:
                self.host_slots = parse_budget(opts.host_budget, expert_bytes=self.expert_bytes, total_experts=L * E)
                need = host_tier_minimum(layer_demand(top_k=trace.top_k, batch=opts.batch, n_experts=E),
                                         opts.max_inflight if opts.prefetching else 0)
                if self.host_slots < need:  # the executor's rule (cli/offload.host_slots), in the same words
                    raise MoeError(f"--host-budget of {self.host_slots} experts is below the host tier's minimum "
                                   f"of {need} ({need * self.expert_bytes:,} bytes): every copy in flight holds a "
                                   "host slot")
                if copies != "analytic":
                    raise MoeError("a host tier (--host-budget) is modelled by the analytic copies only")
        self._setup_host(spec, L)
        self.predictor = make_predictor(opts.predictor, PredictorOptions(
            n_moe_layers=L, n_experts=E, top_k=trace.top_k, lookahead=opts.lookahead,
            trace=trace if opts.predictor.startswith("recorded:") else None,
            seed=opts.seed, recall=opts.recall, precision=opts.precision))

    def _setup_host(self, spec, n_moe_layers: int) -> None:
        """The miss policy, host layers and host profile; the cost rule's ``HostCost`` (host profile for the
        host, the copy link, the cost model's roofline for the device)."""
        opts = self.opts
        self.miss_policy, self.host_layers = opts.policy, opts.host_layer_set(n_moe_layers)
        self.host, self.host_cost = None, None
        if not opts.computes_on_host:
            return
        if self.copy_model == "event":
            raise MoeError("host compute (--miss-policy host|auto, host layers) is modelled by the analytic "
                           "(and lockstep) copies only")
        self.host = load_host(opts.host_profile or DEFAULT_HOST_PROFILE)
        codec, nbytes, flops = spec.expert_dtype or spec.dtype, self.expert_bytes, spec.expert_flops_per_token
        self.host.format_of(codec)  # a profile without this format is refused here, before the run
        host_memo: dict[int, float] = {}
        dev_memo: dict[int, float] = {}

        def host_s(n: int) -> float:
            v = host_memo.get(n)
            if v is None:
                v = host_memo[n] = self.host.expert_seconds(codec, nbytes, flops, n)
            return v

        def device_s(n: int) -> float:
            v = dev_memo.get(n)
            if v is None:
                v = dev_memo[n] = self.cost.expert_seconds(n)
            return v
        self.host_cost = HostCost(host_s=host_s, copy_s=self.copy_s, device_s=device_s)

    def _make_cache(self) -> ExpertCache:
        tr, policy = self.trace, self.opts.eviction
        future = access_sequence(self.w.ids) if EVICTION_POLICIES[policy].needs_future else None
        pop = popularity_counts(tr.expert_ids) if EVICTION_POLICIES[policy].needs_popularity else None
        return ExpertCache(n_slots=self.n_slots, n_moe_layers=tr.n_layers, n_experts=tr.n_experts,
                           experts_per_layer=self.epl, expert_bytes=self.expert_bytes, policy=policy,
                           scope=self.opts.scope, max_inflight=self.opts.max_inflight, future=future, popularity=pop)

    def _compute(self):
        env, tl, proto, link = self.env, self.timeline, self.protocol, self.link
        sync, serve, begin_layer = getattr(link, "synchronous", False), link.serve, link.begin_layer
        wait_s, waited = self.wait_s, 0
        layer_cost, overhead = self.costs.layer.tolist(), self.costs.overhead.tolist()
        stall_l = self.layer_stall
        slow = self.slowdown
        self.interference_s = 0.0
        hybrid, HOST = self.host_cost is not None, Outcome.HOST
        counts_all = self.w.counts
        n_tok, ctx, n_unique = self.w.n_tokens.tolist(), self.w.ctx_sum.tolist(), self.w.n_unique.tolist()
        host_busy = host_wait = saved = 0.0
        first_token = self.w.first_token.tolist()
        step_end = self.step_end = []
        step_stall = self.step_stall = []  # per step: the compute's waits for copies
        # t: the compute's instant, summed layer by layer in this one order by every copy model, so
        # that their times are the same floats; simpy's clock catches up only when a copy event
        # falls at or before t (wake_at: after the copy events of that instant)
        t = 0.0
        for s, step_ids in enumerate(self.w.ids):
            proto.begin_step(token=first_token[s], future=step_ids.__getitem__, routing=step_ids)
            stalled = 0.0
            costs_s = layer_cost[s]
            for l, ids in enumerate(step_ids):
                if not sync and t > env.now and env.peek() <= t:
                    yield wake_at(env, t)  # let copies that finish by this access finish
                begin_layer(t)
                waits = proto.layer(l, ids, counts=None if counts_all is None else counts_all[s][l])
                t0 = t
                t1 = serve(waits, l, t) if sync else (yield from serve(waits, l, t))
                if waits:
                    waited += 1
                    if wait_s:
                        t1 = max(t1, t) + wait_s
                if t1 > t:
                    stall_l[l] += t1 - t
                    stalled += t1 - t
                    if tl is not None:
                        tl.add("compute", "stall", t, t1 - t, layer=l)
                    t = t1
                c = costs_s[l]
                hs = proto.host_seconds if hybrid else 0.0
                if hs:  # the device computes only the experts the host does not (the host resource)
                    cs = None if counts_all is None else counts_all[s][l]
                    rows = [i for i, row in enumerate(proto.in_use) if row[2] is HOST]
                    c_dev = self.cost.layer_seconds_without(n_tok[s], ctx[s], n_unique[s][l], len(rows),
                                                            len(rows) if cs is None else sum(cs[i] for i in rows))
                    saved += c - c_dev
                    c = c_dev
                    host_busy += hs
                    if tl is not None:
                        tl.add("host", f"L{l}", t0, hs, step=s, experts=len(rows))
                if slow:
                    c = self._stretched(c, t)
                if tl is not None:
                    tl.add("compute", f"L{l}", t, c, step=s)
                t += c
                if hs and t0 + hs > t:  # the layer ends when the host's experts are done too: not stall
                    host_wait += t0 + hs - t
                    t = t0 + hs
                proto.end_layer()
            c = overhead[s] if not slow else self._stretched(overhead[s], t)
            if tl is not None:
                tl.add("compute", "dense+head", t, c, step=s)
            t += c
            step_end.append(t)
            step_stall.append(stalled)
            proto.end_step()
        self.layers_waited = waited
        self.host_busy_s, self.host_wait_s, self.host_saved_s = host_busy, host_wait, saved
        if t > env.now:
            yield wake_at(env, t)

    def _stretched(self, c: float, t: float) -> float:
        """Compute of cost ``c`` from ``t`` at 1/(1+s) of its speed while the copy engines are busy."""
        b = self.link.busy_until() - t
        if b <= 0:
            return c
        k = 1.0 + self.slowdown
        d = c * k if b >= c * k else b + (c - b / k)
        self.interference_s += d - c
        return d

    def _tier_report(self, stats: dict) -> dict:
        """expert_source, and with disk: bytes read from storage (and the host tier's counts)."""
        if not self.disk:
            return {"expert_source": "memory"}
        out = {"expert_source": "disk"}
        if self.host_slots is None:  # two tiers: every copy that ran (withdrawn ones did not) was a read
            out["bytes_read"] = stats["bytes_h2d"]
        elif self.tier is not None:
            out.update(self.tier.report())
        return out

    def _link_bytes_per_s(self) -> float:
        dev = self.cost.device
        return dev.read_bandwidth_gbps * 1e9 if self.disk and self.host_slots is None else dev.h2d_bytes_per_s

    def _phase_times(self) -> dict:
        """Simulated seconds of steps whose first token was recorded as prefill, and as decode (and the
        decode steps' waits for copies)."""
        ends = np.asarray(self.step_end)
        dur = np.diff(ends, prepend=0.0)
        decode = self.trace.phase[self.w.first_token] == PHASE_DECODE
        return {"prefill": float(dur[~decode].sum()), "decode": float(dur[decode].sum()),
                "decode_steps": int(decode.sum()), "decode_stall": float(np.asarray(self.step_stall)[decode].sum())}

    def _host_expert_s(self) -> float | None:
        """The host's time for one expert at one token (the hybrid bound's host rate), or None (also with
        experts on disk, where the host computes none)."""
        if self.disk:
            return None
        if self.host_cost is not None:
            return self.host_cost.host_s(1)
        host = load_host(self.opts.host_profile or DEFAULT_HOST_PROFILE)
        spec = self.cost.spec
        codec = spec.expert_dtype or spec.dtype
        if FORMATS.get(codec, codec) not in host.formats:
            return None
        return host.expert_seconds(codec, self.expert_bytes, spec.expert_flops_per_token, 1)

    def _bounds_key(self) -> str | None:
        """The Belady count's cache key; None for a workload passed in that was not cut from the trace."""
        if self._own_workload is False:
            return None
        return BoundsCache.key(trace_digest(self.trace), self.n_slots, self.opts.scope, self.trace.n_tokens,
                               self.opts.batch)

    def run(self) -> dict:
        t_wall = time.perf_counter()
        opts, dev = self.opts, self.cost.device
        self.env = simpy.Environment()
        self.cache = self._make_cache()
        if self.copy_model == "lockstep":
            self.link = LockstepCopies(self.cache, self.lockstep_per_layer)
        elif self.copy_model == "analytic":
            self.tier = None if self.host_slots is None else HostTier(
                capacity=self.host_slots, readers=1, read_s=self.read_s,
                expert_bytes=self.expert_bytes)
            self.link = AnalyticCopies(self.cache, engines=self.link_engines, copy_s=self.link_s,
                                       timeline=self.timeline, source=self.tier, idle_s=self.link_idle_s)
        else:
            self.link = EventCopies(self.env, self.cache, engines=self.link_engines, copy_s=self.link_s,
                                    timeline=self.timeline, fast=self.fast, idle_s=self.link_idle_s)
        self.protocol = LayerProtocol(self.cache, self.link, self.predictor, prefetch_width=opts.prefetch_width,
                                      miss_policy=self.miss_policy, host_cost=self.host_cost,
                                      host_layers=self.host_layers)
        self.layer_stall = [0.0] * self.trace.n_layers
        if self.timeline is not None:
            self.timeline.lane("compute")
            if self.host_cost is not None:
                self.timeline.lane("host")
        done = self.env.process(self._compute())
        self.env.run(until=done)
        if hasattr(self.link, "close"):
            self.link.close(self.env.now)
        stats = self.cache.finish().as_dict()
        wall = time.perf_counter() - t_wall
        n_tok = int(self.w.n_tokens.sum())
        compute_s, total_s = self.costs.total - self.host_saved_s, float(self.env.now)
        per_layer = {"hits": stats.pop("layer_hits"), "late": stats.pop("layer_late"),
                     "misses": stats.pop("layer_misses"), "stall_s": self.layer_stall}
        rep = {
            "model": self.cost.spec.name, "device": dev.name, "device_nominal": dev.nominal,
            "options": asdict(opts), "tokens": n_tok, "steps": len(self.w.ids),
            "n_slots": self.n_slots, "budget_bytes": self.n_slots * self.expert_bytes,
            "budget_fraction": self.n_slots / (self.trace.n_layers * self.trace.n_experts),
            "expert_bytes": self.expert_bytes, "copy_s": self.link_s, "copy_idle_s": self.link_idle_s,
            **stats, **self._tier_report(stats),
            "hit_rate": stats["hits"] / max(stats["accesses"], 1),
            "compute_s": compute_s, "stall_s": sum(self.layer_stall), "interference_s": self.interference_s,
            "miss_policy": self.miss_policy, "host_profile": self.host.name if self.host else None,
            "host_layers": sorted(self.host_layers), "host_s": self.host_busy_s, "host_wait_s": self.host_wait_s,
            "memory": self.memory.as_dict(),
            "total_s": total_s,
            "tokens_per_s": n_tok / total_s if total_s > 0 else float("inf"),
            "phase_s": self._phase_times(), "layers_waited": self.layers_waited,
            "per_layer": per_layer,
            "bounds": bounds(self.w.ids, n_slots=self.n_slots, scope=opts.scope, n_moe_layers=self.trace.n_layers,
                             key=self._bounds_key(), cache=self.bounds_cache,
                             expert_bytes=self.expert_bytes, compute_s=self.resident_s, n_tokens=n_tok,
                             h2d_bytes_per_s=self._link_bytes_per_s(), copy_engines=self.link_engines,
                             host_expert_s=self._host_expert_s()),
            "wall_s": wall, "accesses_per_wall_s": stats["accesses"] / wall if wall > 0 else float("inf"),
        }
        if self.host_cost is not None:  # host compute takes work off the device: its own proven bound
            rep["bounds"].update(hybrid_floor(self.cost, self.w, self.host_cost.host_s))
        return rep
