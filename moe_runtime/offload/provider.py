"""The offloading expert provider: a fixed pool of device slots, the cache's bookkeeping, a copy engine,
a predictor, accounting and a timeline, behind the ``ExpertProvider`` interface of model/experts.py.

Contract:

- The slot pool is one flat device tensor [n_slots, expert_numel] allocated once
  (or lent by the caller as ``pool``, e.g. a benchmark reusing it across runs),
  with the (w1, w3, w2) views of every slot built once; the decode path
  allocates no tensor; the model computes each expert from its slot's views
  in place (nothing gathers or copies a slot).
- It implements ``ExpertProvider`` (model/experts.py), every call of it:
  ``begin_step(start, n)`` opens a forward pass over positions
  start..start+n-1 (a prefill chunk or one decode step); every MoE layer then
  calls ``prepare(layer, hidden)`` (the predictor's device rankings, read back
  with the ids), and per wave of at most ``capacity(layer)`` experts
  ``experts(layer, ids, hidden, rankings)`` and ``end_layer(layer)``. What
  happens at a layer is decided by ``core/protocol.py`` (the simulator runs the
  same one); this provider is its ``CopyLink`` (withdraw, demand, promote,
  prefetch on the copy engine), then waits for the layer's missing and late
  slots (the only place the compute waits for copies) and returns their views.
  ``max_inflight`` is the cap as fitted to the budget (core/budget.py's
  ``fit_budget``); ``capacity`` is the pool less it.
- Outputs never depend on the policy: the views returned always hold the
  experts asked for, complete, and no slot in use or loading is overwritten.
- ``report()`` gives counts (``CacheStats``), stall time per layer and per step
  (CUDA events on a GPU, the monotonic clock on CPU) and the achieved copy
  bandwidth; ``write_timeline(path)`` a Perfetto JSON with a compute lane and a
  lane per copy engine.

This module does not parse flags or files (offload_cli.py) and moves bytes only
through copy_engine.py; which expert sits where is expert_cache.py's business.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from moe_runtime.core.errors import MoeError
from moe_runtime.core.expert_cache import ExpertCache, Outcome
from moe_runtime.core.keys import Key
from moe_runtime.core.protocol import HostCost, LayerProtocol
from moe_runtime.core.budget import wave_capacity
from moe_runtime.model.experts import ExpertProvider, ExpertWeights, HostExpertStore
from moe_runtime.model.host_experts import host_weights, uses_int4_kernel
from moe_runtime.offload.cuda_engine import make_copy_engine
from moe_runtime.offload.engines import achieved_gbps
from moe_runtime.predictors import Predictor
from moe_runtime.core.timeline import Timeline


class LayerClock:
    """Three marks per MoE layer and step: before the copy wait, after it, and at the layer's end.

    On CUDA the marks are events on the compute stream (read back once the step
    is finished); on CPU they are ``time.perf_counter`` readings. Both are in
    seconds since the copy engine's ``base``, so they share the copies' clock.
    """

    def __init__(self, n_moe_layers: int, device: torch.device, base) -> None:
        self.cuda = device.type == "cuda"
        # on CPU the base is the engine's perf_counter origin (0 for an engine without one, e.g. a test's)
        self.base = base if self.cuda or isinstance(base, float) else 0.0
        self.t = [[0.0, 0.0, 0.0] for _ in range(n_moe_layers)]
        self.pending = [False] * n_moe_layers
        if self.cuda:
            self.ev = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(n_moe_layers)]

    def mark(self, layer: int, i: int) -> None:
        if self.cuda:
            self.ev[layer][i].record(torch.cuda.current_stream())
        else:
            self.t[layer][i] = time.perf_counter() - self.base
        self.pending[layer] = True

    def collect(self) -> list[tuple[int, float, float, float]]:
        """(layer, before wait, after wait, layer end) for every layer marked since the last collect."""
        out = []
        for layer, p in enumerate(self.pending):
            if not p:
                continue
            if self.cuda:
                # CPU waits on the GPU here (normally already done: the step's token was read back)
                self.ev[layer][2].synchronize()
                self.t[layer] = [self.base.elapsed_time(e) / 1e3 for e in self.ev[layer]]
            out.append((layer, *self.t[layer]))
            self.pending[layer] = False
        return out


class OffloadedExperts(ExpertProvider):
    """Serves a model's MoE layers from ``n_slots`` device slots; see the module docstring."""

    def __init__(self, store: HostExpertStore, device: torch.device | str, n_slots: int, *,
                 policy: str = "lru", scope: str = "global", predictor: Predictor | None = None,
                 prefetch_width: int | None = None, max_inflight: int = 4,
                 future: Sequence[Key] | None = None, popularity: dict[Key, float] | None = None,
                 timeline: bool = False, record_predictions: bool = False, pool: Tensor | None = None,
                 make_engine: Callable = make_copy_engine,
                 source: Callable[[int, int], object] | None = None, miss_policy: str = "copy",
                 host_cost: HostCost | None = None, host_layers: frozenset = frozenset(),
                 host_store: HostExpertStore | None = None) -> None:
        """``make_engine(n_slots, device)`` builds the copy engine (tests pass a deterministic or fake one);
        ``source(layer, expert)`` is what the engine copies from (default: the store's flat host buffer;
        the storage engine takes the expert's byte ranges on disk, and the store then holds no experts).
        ``miss_policy``, ``host_cost`` and ``host_layers``: hybrid execution (core/protocol.py); the
        experts the protocol sends to the host are computed from the store's host copies, or from
        ``host_store``'s (the same experts in another format: ``--host-dtype``)."""
        if (miss_policy != "copy" or host_layers) and not store.holds_experts:
            raise MoeError("host compute (--miss-policy host|auto, host layers) needs the experts in host "
                           "memory; with --expert-source disk use --miss-policy copy")
        self.store, self.device = store, torch.device(device)
        self.n_moe_layers, self.top_k = store.n_moe_layers, store.top_k
        layout = store.layout
        self.cache = ExpertCache(
            n_slots=n_slots, n_moe_layers=store.n_moe_layers, n_experts=store.n_experts, experts_per_layer=store.top_k,
            expert_bytes=layout.nbytes, policy=policy, scope=scope, max_inflight=max_inflight,
            future=future, popularity=popularity)
        self.n_slots = self.cache.n_slots  # per-layer scope rounds down to equal shares
        if pool is None:
            pool = torch.empty(self.n_slots, layout.numel, dtype=layout.dtype, device=self.device)  # [S, numel]
        elif pool.shape[0] < self.n_slots or pool.shape[1:] != (layout.numel,) or pool.dtype != layout.dtype:
            raise ValueError(f"pool {tuple(pool.shape)} {pool.dtype} cannot hold {self.n_slots} experts")
        self.pool = pool[: self.n_slots]
        self.slot_flat = [self.pool[s] for s in range(self.n_slots)]  # [numel] views, built once
        self.views = [layout.views(f) for f in self.slot_flat]  # (w1, w3, w2) views, built once
        source = source or store.flat
        self.src = [[source(m, e) for e in range(store.n_experts)] for m in range(store.n_moe_layers)]
        self.engine = make_engine(self.n_slots, self.device)
        self._release = getattr(self.engine, "needs_release", True)
        self.clock = LayerClock(self.n_moe_layers, self.device, self.engine.base)
        self.copy_s = host_cost.copy_s if host_cost is not None else 0.0
        self.protocol = LayerProtocol(self.cache, self, predictor, prefetch_width=prefetch_width,
                                      record_predictions=record_predictions, miss_policy=miss_policy,
                                      host_cost=host_cost, host_layers=host_layers)
        self.miss_policy = miss_policy
        self.host_store = host_store or store
        self._host_format = None if host_store is None or host_store.layout == store.layout else host_store.layout
        self._host_views: dict[Key, object] = {}  # host views of experts computed on the host, built once each
        self._int4_kernel = uses_int4_kernel(self.host_store.layout, self.device, self._host_format is not None)
        self._on_host: tuple[int, ...] = ()
        self.predictor, self.prefetching = predictor, self.protocol.prefetching
        self.width = self.protocol.width
        self.timeline = Timeline("moe-runtime") if timeline else None
        if self.timeline is not None:
            self.timeline.lane("compute")
            for lane in self.engine.lanes:
                self.timeline.lane(lane)
        self.layer_stall_s = [0.0] * self.n_moe_layers
        self.step_stall_s: list[float] = []
        self._steps = 0
        self._open = False  # a step has begun and is not yet folded into the counters

    # -- the protocol's CopyLink: carry out its commands on the copy engine ----------------
    def withdraw(self, slot: int) -> bool:
        return self.engine.cancel_if_queued(slot)

    def demand(self, slot: int, key: Key) -> None:
        self.engine.submit(slot, self.src[key[0]][key[1]], self.slot_flat[slot], demand=True)

    def promote(self, slot: int) -> None:
        self.engine.promote(slot)

    def prefetch(self, slot: int, key: Key) -> None:
        self.engine.submit(slot, self.src[key[0]][key[1]], self.slot_flat[slot], demand=False)

    def backlog_s(self) -> float:
        return self.engine.backlog() * self.copy_s

    def ready_in_s(self, slot: int) -> float | None:
        return self.engine.ready_in(slot, self.copy_s)

    def fill(self, slot: int, key: Key) -> None:
        self.engine.fill(slot, self.src[key[0]][key[1]], self.slot_flat[slot])

    def capacity(self, layer: int) -> int:
        """The most distinct experts one ``experts`` call may hold at ``layer``: its pool less the slots
        in-flight prefetches may take. A step needing more (a long prompt's union) comes in waves."""
        c = self.cache
        return wave_capacity(n_slots=c.n_slots, scope=c.scope, n_moe_layers=self.n_moe_layers,
                             max_inflight=c.max_inflight, prefetching=self.prefetching)

    # -- steps ---------------------------------------------------------------------------
    def begin_step(self, start: int, n: int, future: Callable[[int], Sequence[int]] | None = None,
                   token: int | None = None) -> None:
        """A forward pass over positions start..start+n-1 begins.

        ``future(layer)`` gives its true ids (oracles); ``token`` is the trace index of its first token when
        routing is forced (recorded predictions), else the position.
        """
        self._close_step()
        self.protocol.begin_step(token=start if token is None else token, future=future)
        self._steps += 1
        self._open = True
        self.step_stall_s.append(0.0)

    def prepare(self, layer: int, hidden: Tensor) -> Tensor | None:
        """Device-side predictor output the model fetches together with the layer's expert ids (one
        device-to-host transfer per layer); the host copy comes back as ``experts(..., rankings)``."""
        proto = self.protocol
        return proto.predictor.device_ranking(layer, hidden) if proto.predicts else None

    def experts(self, layer: int, ids: list[int], hidden: Tensor, rankings: list[list[int]] | None = None,
                counts: list[int] | None = None) -> dict[int, ExpertWeights]:
        cache, engine = self.cache, self.engine
        for slot in engine.poll():  # copies finished since the last layer (no waiting)
            cache.copy_done(slot)
        waits = self.protocol.layer(layer, ids, hidden, rankings, counts)
        self.clock.mark(layer, 0)
        for slot in waits:
            # the compute waits here for this layer's missing and late experts only
            # (CUDA: the compute stream waits on the slot's copy event; CPU: the thread blocks on its flag)
            engine.wait(slot)
            cache.copy_done(slot)
        self.clock.mark(layer, 1)
        views, in_use = self.views, self.protocol.in_use
        if self.protocol.hybrid:
            self._on_host = tuple(e for e, _, o in in_use if o is Outcome.HOST)
            if self._on_host:
                return {e: self._host_view(layer, e) if o is Outcome.HOST else views[slot] for e, slot, o in in_use}
        return {e: views[slot] for e, slot, _ in in_use}

    def on_host(self, layer: int) -> tuple[int, ...]:
        return self._on_host

    def may_host(self, layer: int) -> bool:
        return self.miss_policy != "copy" or layer in self.protocol.host_layers

    def _host_view(self, layer: int, e: int):
        v = self._host_views.get((layer, e))
        if v is None:
            v = self._host_views[(layer, e)] = host_weights(self.host_store.layout, self.host_store.weights(layer, e),
                                                            self._int4_kernel)
        return v

    @property
    def host_format(self):
        return self._host_format

    def end_layer(self, layer: int) -> None:
        self.clock.mark(layer, 2)
        if self._release:  # later copies into these slots wait for this layer's reads (CUDA)
            for _, slot, outcome in self.protocol.in_use:
                if outcome is not Outcome.HOST:
                    self.engine.slot_released(slot)
        self._on_host = ()
        self.protocol.end_layer()

    def flush(self) -> None:
        """Close the open step (its stall time, timeline events, predictor update) so ``report()`` includes it."""
        self._close_step()

    def _close_step(self) -> None:
        """Fold the open step's marks into the stall counters and the timeline; feed the predictor. Idempotent."""
        if not self._open:
            return
        self._open = False
        for layer, t0, t1, t2 in self.clock.collect():
            stall = max(t1 - t0, 0.0)
            self.layer_stall_s[layer] += stall
            self.step_stall_s[-1] += stall
            if self.timeline is not None:
                if stall > 0:
                    self.timeline.add("compute", f"wait L{layer}", t0, stall, step=self._steps)
                self.timeline.add("compute", f"moe L{layer}", t1, t2 - t1, step=self._steps)
        self.protocol.end_step()

    def predictions_array(self, layer_count: int, lookahead: int) -> np.ndarray:
        """The last step's predictions as int16 [L, D, P] (P = prefetch width), -1 padded, for traces."""
        out = np.full((layer_count, lookahead, self.width), -1, dtype=np.int16)
        for layer, preds in enumerate(self.protocol.predictions):
            for d, ranked in enumerate(preds[:lookahead]):
                r = np.asarray(ranked)[: self.width]
                out[layer, d, : len(r)] = r
        return out

    # -- results ---------------------------------------------------------------------------
    def finish(self) -> dict:
        """End of run: drain copies, close counters; returns ``report()``."""
        self._close_step()
        for slot in self.engine.poll():
            self.cache.copy_done(slot)
        self.engine.close()
        self.cache.finish()
        return self.report()

    def report(self) -> dict:
        st = self.cache.stats
        recs = list(self.engine.records)
        out = {k: getattr(st, k) for k in ("accesses", "hits", "late", "misses", "prefetch_issued",
                                           "prefetch_used", "prefetch_wasted", "prefetch_cancelled",
                                           "evictions", "bytes_h2d", "host_computed", "fills")}
        out["miss_policy"] = self.miss_policy
        out["host_layers"] = sorted(self.protocol.host_layers)
        out["stall_s"] = sum(self.layer_stall_s)
        out["budget_slots"] = self.n_slots
        out["budget_bytes"] = self.n_slots * self.store.layout.nbytes
        out["copies"] = len(recs)
        out["copy_gbps"] = achieved_gbps(recs)
        if hasattr(self.engine, "bytes_read"):  # the storage link: bytes fetched from disk (over-reads included)
            out["bytes_read"], out["read_mode"] = self.engine.bytes_read, self.engine.mode
        tier = getattr(self.engine, "index", None)
        if tier is not None:  # three tiers: the host-RAM tier's counts (tiered.py)
            out.update(host_slots=tier.capacity, host_hits=tier.hits, host_misses=tier.misses)
        out["step_stall_s"] = list(self.step_stall_s)
        out["layers"] = [
            {"layer": m, "hits": st.layer_hits[m], "late": st.layer_late[m], "misses": st.layer_misses[m],
             "stall_s": self.layer_stall_s[m]} for m in range(self.n_moe_layers)]
        return out

    def write_timeline(self, path) -> None:
        """Compute lane (MoE layers, waits) and one lane per copy engine, atomically."""
        tl = self.timeline or Timeline("moe-runtime")
        for r in self.engine.records:
            tl.add(r.lane, "demand" if r.demand else "prefetch", r.start_s, r.end_s - r.start_s,
                   slot=r.slot, bytes=r.nbytes)
        tl.write(path)
