"""Replay a routing trace on a modelled device with simpy, and report hits, stalls and tokens/s.

Contract (DESIGN.md's semantics, the runtime's own bookkeeping):
- A *step* is one forward pass over B tokens, one from each of B sequences
  decoded together (continuous batching: a lane that finishes its sequence
  takes the next one in trace order). B=1 replays the trace token by token.
  Every token is replayed as a decode step, whatever its recorded phase.
- A layer of a step needs the union of its tokens' experts, in order of first
  appearance (token-major, then rank). The ``ExpertCache`` (runtime) classifies
  each as hit, late or miss and chooses victims with the runtime's eviction
  policies; predictions come from the runtime's trace-only predictors and
  ``plan_prefetch``. The cache starts empty (cold).
- Per layer, in simulated time: access -> cancel stale queued prefetches ->
  demand copies for misses (priority above every prefetch; a late prefetch
  still queued is promoted to demand priority) -> wait for misses and lates
  (stall) -> predict and issue prefetches -> compute ``env.timeout(cost)`` ->
  release pins and record routing. After the last layer: the step's dense
  layers and output head (cost model ``overhead``), ``predictor.observe``.
- Copy engines are one simpy ``PriorityResource`` (capacity = copy_engines);
  each copy is a process that holds one engine for latency + bytes/bandwidth.
- total_s = compute_s + stall_s. With no prefetch and one engine every stall is
  whole demand copies, so total_s = compute_s + misses x (bytes/bw + latency).

Speed: hits create no simpy events. Compute time is accumulated in ``pending``
and yielded as one ``env.timeout`` only when something must happen at the
right instant (a copy to issue or wait for, or a scheduled event that falls
before the next access), which is exact because nothing else can change the
cache in between.

Bounds (``bounds``): all-resident time = compute time with no copies; best
possible = max(all-resident time, Belady's miss bytes / aggregate copy
bandwidth): Belady eviction with a perfect prefetcher limited only by bandwidth
(no latency, copies fully overlapped), computed, not simulated.

``load_inputs`` is the one place that turns a trace path, a model name/file/
checkpoint directory and a token count into a checked (trace, ModelSpec); the
rest of this module knows nothing about files or the command line.
"""

from __future__ import annotations

import json
import time
from collections import deque
from pathlib import Path
from dataclasses import asdict, dataclass

import numpy as np
import simpy

from moe_runtime.cache.budget import check_budget, parse_budget
from moe_runtime import config_files
from moe_runtime.errors import MoeError
from moe_runtime.model.spec import ModelSpec, available_models, load_model_spec
from moe_runtime.traces import PHASE_DECODE, load_trace
from moe_runtime.cache.expert_cache import READY, ExpertCache, Outcome, access_sequence
from moe_runtime.cache.policies import EVICTION_POLICIES
from moe_runtime.predictors import PREDICTORS, PredictContext, PredictorOptions, RoutingHistory, \
    make_predictor, plan_prefetch
from moe_runtime.timeline import Timeline

from .bounds import bounds
from .cost_model import CostModel, StepCosts

DEMAND, PREFETCH = 0, 1  # PriorityResource: lower runs first
_MISS, _LATE = Outcome.MISS, Outcome.LATE


@dataclass(frozen=True)
class ReplayOptions:
    """One simulated configuration; the CLI and the sweep take their defaults from here."""

    budget: str = "25%"
    eviction: str = "lru"
    predictor: str = "none"
    lookahead: int = 1  # as moe-runtime generate
    scope: str = "global"
    batch: int = 1
    max_inflight: int = 4
    prefetch_width: int | None = None  # experts per predicted layer; None: what one layer needs
    tokens: int | None = None  # replay only the first N tokens
    recall: float = 0.9  # noisy-oracle
    precision: float = 0.9  # noisy-oracle
    seed: int = 0

    def __post_init__(self) -> None:
        if self.eviction not in EVICTION_POLICIES:
            raise MoeError(f"unknown eviction policy {self.eviction!r}; choose one of {', '.join(EVICTION_POLICIES)}")
        name = self.predictor.split(":", 1)[0]
        cls = PREDICTORS.get(name)
        if cls is None or (name == "recorded") != self.predictor.startswith("recorded:"):
            known = ", ".join(n for n, c in PREDICTORS.items() if not c.needs_hidden and n != "recorded")
            raise MoeError(f"unknown predictor {self.predictor!r}; the simulator can use {known} or recorded:NAME")
        if cls.needs_hidden:
            raise MoeError(f"predictor {self.predictor!r} reads hidden states, so it runs only in the executor; "
                           f"replay its recorded predictions instead with --predictor recorded:{self.predictor}")
        if self.scope not in ("global", "per-layer"):
            raise MoeError(f"cache scope must be 'global' or 'per-layer', not {self.scope!r}")
        for f, lo in (("lookahead", 1), ("batch", 1), ("max_inflight", 1), ("prefetch_width", 1), ("tokens", 1)):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < lo):
                raise MoeError(f"{f} must be an integer >= {lo}, got {v!r}")

    @property
    def prefetching(self) -> bool:
        return self.predictor != "none"


def load_inputs(trace_path, model: str | None = None, tokens: int | None = None):
    """Load the trace (its first ``tokens``) and the model spec; check that they describe one model.

    ``model``: a configs/models name, a YAML file, or a checkpoint directory with config.json;
    by default the trace's ``meta.model`` when it names one of those.
    """
    trace = load_trace(config_files.bundled(trace_path))
    if tokens is not None and tokens < trace.n_tokens:
        trace = trace.slice(0, tokens)
    name = model or trace.meta.model
    if (Path(name) / "config.json").is_file():
        try:
            cfg = json.loads((Path(name) / "config.json").read_text())
        except ValueError as e:
            raise MoeError(f"{name}/config.json: not valid JSON ({e})") from None
        spec = ModelSpec.from_hf_config(cfg, name=Path(name).name)
    elif model is None and name not in available_models() and not Path(name).is_file():
        raise MoeError(f"the trace's model {name!r} is not in configs/models "
                       f"({', '.join(available_models())}): pass --model NAME|FILE|DIR")
    else:
        spec = load_model_spec(name)
    m = trace.meta
    for what, a, b in (("MoE layers", spec.n_moe_layers, m.n_layers), ("experts", spec.n_experts, m.n_experts),
                       ("top-k", spec.top_k, m.top_k)):
        if a != b:
            raise MoeError(f"model {spec.name} has {a} {what} but the trace {trace_path} has {b}")
    if m.expert_bytes and m.expert_bytes != spec.expert_bytes:
        raise MoeError(f"model {spec.name} has experts of {spec.expert_bytes:,} bytes but the trace records "
                       f"{m.expert_bytes:,}")
    return trace, spec


@dataclass(frozen=True)
class Workload:
    """The trace cut into steps: ids[s][l] = experts step s needs at layer l (the union)."""

    ids: list  # [S][L] lists of ints
    first_token: np.ndarray  # [S] trace index of each step's first token
    n_tokens: np.ndarray  # [S]
    ctx_sum: np.ndarray  # [S] summed context lengths (position + 1)
    n_unique: np.ndarray  # [S, L]

    @property
    def experts_per_layer(self) -> int:
        return int(self.n_unique.max())


def build_workload(trace, batch: int) -> Workload:
    """Cut ``trace`` into steps of up to ``batch`` tokens (continuous batching over its sequences)."""
    ids_all = trace.expert_ids
    ctx = trace.position.astype(np.int64) + 1
    if batch == 1:
        T, L, K = ids_all.shape
        return Workload(ids_all.tolist(), np.arange(T), np.ones(T, np.int64), ctx, np.full((T, L), K))
    queue = deque(trace.sequences())
    lanes: list = [None] * batch  # [next token, stop] per lane
    steps = []
    while True:
        for i in range(batch):
            if (lanes[i] is None or lanes[i][0] >= lanes[i][1]) and queue:
                _, a, b = queue.popleft()
                lanes[i] = [a, b]
        toks = [ln[0] for ln in lanes if ln is not None and ln[0] < ln[1]]
        if not toks:
            break
        for ln in lanes:
            if ln is not None and ln[0] < ln[1]:
                ln[0] += 1
        steps.append(toks)
    per_tok = ids_all.tolist()
    ids = [[list(dict.fromkeys(e for t in toks for e in per_tok[t][l])) for l in range(trace.n_layers)]
           for toks in steps]
    return Workload(ids, np.array([s[0] for s in steps]), np.array([len(s) for s in steps]),
                    np.array([int(ctx[s].sum()) for s in steps]),
                    np.array([[len(x) for x in row] for row in ids]))


class Replay:
    """One simulation of ``workload`` on ``cost``'s device; ``run()`` returns the report dict."""

    def __init__(self, trace, cost: CostModel, opts: ReplayOptions, *, workload: Workload | None = None,
                 timeline: Timeline | None = None, fast: bool = True) -> None:
        self.trace, self.cost, self.opts, self.timeline, self.fast = trace, cost, opts, timeline, fast
        spec, dev = cost.spec, cost.device
        if workload is None and opts.tokens is not None and opts.tokens < trace.n_tokens:
            self.trace = trace = trace.slice(0, opts.tokens)
        self.w = workload or build_workload(trace, opts.batch)
        self.costs: StepCosts = cost.step_costs(self.w.n_tokens, self.w.ctx_sum, self.w.n_unique)
        L, E = trace.n_layers, trace.n_experts
        self.expert_bytes = spec.expert_bytes
        self.n_slots = parse_budget(opts.budget, expert_bytes=self.expert_bytes, total_experts=L * E)
        self.epl = self.w.experts_per_layer
        check_budget(self.n_slots, experts_per_layer=self.epl, max_inflight=opts.max_inflight,
                     prefetching=opts.prefetching, scope=opts.scope, n_layers=L, expert_bytes=self.expert_bytes)
        self.width = opts.prefetch_width or self.epl
        self.copy_s = dev.copy_seconds(self.expert_bytes)
        self.predictor = make_predictor(opts.predictor, PredictorOptions(
            n_layers=L, n_experts=E, top_k=trace.top_k, lookahead=opts.lookahead,
            trace=trace if opts.predictor.startswith("recorded:") else None,
            seed=opts.seed, recall=opts.recall, precision=opts.precision))

    def _make_cache(self, policy: str, max_inflight: int) -> ExpertCache:
        tr = self.trace
        future = access_sequence(self.w.ids) if EVICTION_POLICIES[policy].needs_future else None
        pop = None
        if EVICTION_POLICIES[policy].needs_popularity:
            pop = {(l, e): float(c) for l in range(tr.n_layers)
                   for e, c in enumerate(np.bincount(tr.expert_ids[:, l].ravel(), minlength=tr.n_experts))}
        return ExpertCache(n_slots=self.n_slots, n_layers=tr.n_layers, n_experts=tr.n_experts,
                           experts_per_layer=self.epl, expert_bytes=self.expert_bytes, policy=policy,
                           scope=self.opts.scope, max_inflight=max_inflight, future=future, popularity=pop)

    # -- simpy processes ---------------------------------------------------------------
    def _copy(self, slot: int, layer: int, expert: int, priority: int, req, done):
        """Wait for an engine (``req``), hold it for one expert's copy, mark the slot ready."""
        env = self.env
        issued = env.now
        yield req  # a cancelled request never fires: the process simply ends with the run
        engine = self._free_engines.pop()
        start = env.now
        yield env.timeout(self.copy_s)
        self._free_engines.append(engine)
        self.engines.release(req)
        self.cache.copy_done(slot)
        if self.timeline is not None:
            self.timeline.add(f"copy engine {engine}", f"L{layer} e{expert}", start, self.copy_s,
                              kind="demand" if priority == DEMAND else "prefetch", issued_us=issued * 1e6)
        done.succeed()

    def _issue(self, slot: int, layer: int, expert: int, priority: int, done=None) -> None:
        """Queue a copy into ``slot``; ``done`` fires when it completes (kept when a copy is promoted)."""
        req = self.engines.request(priority=priority)
        done = done or self.env.event()
        self._copies[slot] = [req, done]
        self.env.process(self._copy(slot, layer, expert, priority, req, done))

    def _demand_on_idle_engines(self, misses, layer: int, now: float) -> float:
        """Demand copies when no copy is running or queued: engine j takes copies j, j+n, ... back to
        back, so the stall is known without simpy events (same result as the event path)."""
        n, cs = self.cost.device.copy_engines, self.copy_s
        for i, (e, slot, _) in enumerate(misses):
            self.cache.copy_done(slot)
            if self.timeline is not None:
                self.timeline.add(f"copy engine {i % n}", f"L{layer} e{e}", now + (i // n) * cs, cs, kind="demand",
                                  issued_us=now * 1e6)
        return -(-len(misses) // n) * cs

    def _queued(self, slot: int) -> bool:
        rec = self._copies.get(slot)
        return rec is not None and not rec[0].triggered

    def _compute(self):
        env, cache, tl = self.env, self.cache, self.timeline
        pred, hist, width = self.predictor, self.history, self.width
        prefetching = self.opts.prefetching
        layer_cost, overhead = self.costs.layer.tolist(), self.costs.overhead.tolist()
        stall_l = self.layer_stall
        first_token = self.w.first_token.tolist()
        step_end = self.step_end = []
        pending = 0.0  # compute not yet yielded: nothing can happen before env.now + pending
        for s, step_ids in enumerate(self.w.ids):
            cache.begin_step()
            costs_s = layer_cost[s]
            future = step_ids.__getitem__
            for l, ids in enumerate(step_ids):
                if pending and env.peek() <= env.now + pending:
                    yield env.timeout(pending)  # let copies that finish before this access finish
                    pending = 0.0
                acc = cache.access_layer(l, ids)
                waits = [(e, slot, o) for e, slot, o in acc.outcomes if o]
                if waits or acc.stale:
                    for slot in acc.stale:
                        if self._queued(slot):  # not started: withdraw it
                            cache.cancel(slot)
                            self._copies.pop(slot)[0].cancel()
                    if self.fast and not (self.engines.count or self.engines.queue) \
                            and all(o is _MISS for _, _, o in waits):
                        stall = self._demand_on_idle_engines(waits, l, env.now + pending)
                        pending += stall  # nothing else can happen while the compute waits
                    else:
                        if pending:
                            yield env.timeout(pending)
                            pending = 0.0
                        for e, slot, o in waits:
                            if o is _MISS:
                                self._issue(slot, l, e, DEMAND)
                            elif self._queued(slot):  # a late prefetch not started: promote to demand
                                self._copies[slot][0].cancel()
                                self._issue(slot, l, e, DEMAND, done=self._copies[slot][1])
                        t0 = env.now
                        for e, slot, o in waits:
                            if cache.state[slot] != READY:
                                yield self._copies[slot][1]  # the compute waits for this expert's copy
                        stall = env.now - t0
                    if stall > 0:
                        stall_l[l] += stall
                        if tl is not None:
                            tl.add("compute", "stall", env.now + pending - stall, stall, layer=l)
                if prefetching:
                    hist.record(l, ids)  # as in the executor: the predictor sees this layer's experts
                    ctx = PredictContext(step=s, layer=l, history=hist, token=first_token[s], future=future)
                    plan = plan_prefetch(pred.predict(ctx), l, width)
                    issued = cache.prefetch(plan, l) if plan else ()
                    if issued:
                        if pending:
                            yield env.timeout(pending)
                            pending = 0.0
                        for (pl, pe), slot in issued:
                            self._issue(slot, pl, pe, PREFETCH)
                if tl is not None:
                    tl.add("compute", f"L{l}", env.now + pending, costs_s[l], step=s)
                pending += costs_s[l]
                cache.release_layer()
            if tl is not None:
                tl.add("compute", "dense+head", env.now + pending, overhead[s], step=s)
            pending += overhead[s]
            step_end.append(env.now + pending)
            if prefetching:
                pred.observe(hist)
                hist.end_step()
        if pending:
            yield env.timeout(pending)

    def _phase_times(self) -> dict:
        """Simulated seconds of steps whose first token was recorded as prefill, and as decode."""
        ends = np.asarray(self.step_end)
        dur = np.diff(ends, prepend=0.0)
        decode = self.trace.phase[self.w.first_token] == PHASE_DECODE
        return {"prefill": float(dur[~decode].sum()), "decode": float(dur[decode].sum()),
                "decode_steps": int(decode.sum())}

    def run(self) -> dict:
        t_wall = time.perf_counter()
        opts, dev = self.opts, self.cost.device
        self.env = simpy.Environment()
        self.engines = simpy.PriorityResource(self.env, capacity=dev.copy_engines)
        self._free_engines = list(range(dev.copy_engines - 1, -1, -1))
        self._copies: dict[int, list] = {}
        self.cache = self._make_cache(opts.eviction, opts.max_inflight)
        self.history = RoutingHistory(self.trace.n_layers)
        self.layer_stall = [0.0] * self.trace.n_layers
        if self.timeline is not None:
            self.timeline.lane("compute")
        done = self.env.process(self._compute())
        self.env.run(until=done)
        stats = self.cache.finish().as_dict()
        wall = time.perf_counter() - t_wall
        n_tok = int(self.w.n_tokens.sum())
        compute_s, total_s = self.costs.total, float(self.env.now)
        per_layer = {"hits": stats.pop("layer_hits"), "late": stats.pop("layer_late"),
                     "misses": stats.pop("layer_misses"), "stall_s": self.layer_stall}
        rep = {
            "model": self.cost.spec.name, "device": dev.name, "device_nominal": dev.nominal,
            "options": asdict(opts), "tokens": n_tok, "steps": len(self.w.ids),
            "n_slots": self.n_slots, "budget_bytes": self.n_slots * self.expert_bytes,
            "budget_fraction": self.n_slots / (self.trace.n_layers * self.trace.n_experts),
            "expert_bytes": self.expert_bytes, "copy_s": self.copy_s,
            **stats,
            "hit_rate": stats["hits"] / max(stats["accesses"], 1),
            "compute_s": compute_s, "stall_s": sum(self.layer_stall), "total_s": total_s,
            "tokens_per_s": n_tok / total_s if total_s > 0 else float("inf"),
            "phase_s": self._phase_times(),
            "per_layer": per_layer,
            "bounds": bounds(self.w.ids, n_slots=self.n_slots, scope=opts.scope, n_layers=self.trace.n_layers,
                             expert_bytes=self.expert_bytes, compute_s=compute_s, n_tokens=n_tok,
                             h2d_bytes_per_s=dev.h2d_bytes_per_s, copy_engines=dev.copy_engines),
            "wall_s": wall, "accesses_per_wall_s": stats["accesses"] / wall if wall > 0 else float("inf"),
        }
        return rep

