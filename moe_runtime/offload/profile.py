"""`moe-runtime profile`: measure this machine's copy and compute speeds and write a device profile YAML.

Contract: ``moe-runtime profile --device cuda|cpu (--model DIR | --model-config YAML|NAME)
[--layers N] [--out FILE.yaml]`` measures

- host-to-device copy bandwidth and latency at the model's expert size, through
  the executor's own copy engine (CUDA: pinned host buffer, copy stream, events;
  CPU: a copy between two host tensors on the copy thread). Latency and
  bandwidth come from a fit t = latency + bytes / bandwidth over a small and an
  expert-sized copy (medians of repeats), where t is what a miss costs the
  compute: the copy's span on the GPU timeline on CUDA, and on CPU the round
  trip from submit to the end of wait (hand-off to the copy thread included);
- device-memory bandwidth (a large on-device copy) and dense matmul TFLOP/s;
- ``layer_compute_ms``: one decode step of the all-resident model divided by its
  MoE layer count (so attention and dense layers are included in the average);
- ``copy_slowdown``: how much longer that step takes while the copy engine copies
  experts non-stop (CPU: the copy thread shares the cores and memory bandwidth;
  0 on CUDA), which the simulator charges to compute that overlaps copies; on a
  CPU with ``--expert-source disk``, while the reader reads experts non-stop
  instead (the storage link is the link of a two-tier run);
- what the executor spends on the host that neither copies nor layer compute
  show, for the simulator to charge: ``demand_us``, the hand-off to and from
  the copy thread per layer that waits (CPU: a small copy's round trip less its
  span on the copy thread; taken out of ``h2d_latency_us`` so a lone miss costs
  what it did; 0 on CUDA, where the compute stream waits on an event);
  ``host_layer_us``, the per-layer cost of the offloading protocol's misses
  (classify, admit, evict, submit) beyond an all-hit layer; ``predictor_us``,
  per trace-only predictor and lookahead, prediction and prefetch planning per
  layer (``measure_protocol``: the runtime's ``LayerProtocol`` on random routing
  of the model's shape, copies completing at the next layer).
  With ``--model-config`` the model is synthetic (random weights at the spec's
  shapes, only ``--layers`` MoE layers so it fits).

Rounds: the copy, device-memory, matmul and layer-compute figures are measured
in ``--rounds`` interleaved rounds (each round measures each once, in turn), so
a slow spell of a shared machine falls on every quantity's rounds alike rather
than on one quantity; each figure is the median of its rounds, and its spread
((max - min) / median) is reported beside it. A spread above ``SPREAD_WARN``
prints one warning line naming the quantities, their ranges and spreads
(``rounds_summary``; two back-to-back runs of one measurement each once gave
0.85 and 7.2 GB/s for the same link).

and writes (atomically, ``moe_runtime.core.outputs``) a YAML in the simulator's device
schema (simulator/device.py) with ``nominal: false``; without ``--out`` it prints
it. ``--out`` is checked and the run's peak memory estimated (weights, a slot
for every expert, the copy buffers) before anything is measured or allocated;
a model that cannot fit is refused with its size and what the machine has.
This module does not know the simulator's cost model.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time

import torch

from moe_runtime.core.options import OffloadOptions
from moe_runtime.offload.cuda_engine import make_copy_engine
from moe_runtime.offload.provider import OffloadedExperts
from moe_runtime.offload.session import build_run

_HBM_BYTES = 256 * 2**20  # measure_hbm's buffer (two of them)
SPREAD_WARN = 0.25  # a quantity whose rounds spread wider than this ((max - min) / median) is warned about


def interleaved_rounds(measures: dict, rounds: int) -> dict[str, list[float]]:
    """Samples per field: ``measures`` maps a name to a function returning {field: value}; each round calls
    every function once, in turn, so the rounds of all quantities interleave in time."""
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        for fn in measures.values():
            for field, value in fn().items():
                samples.setdefault(field, []).append(float(value))
    return samples


def rounds_summary(samples: dict[str, list[float]], warn: dict[str, str],
                   limit: float = SPREAD_WARN) -> tuple[dict[str, float], dict[str, float], str | None]:
    """(median per field, spread per field, one warning line or None) of ``interleaved_rounds``' samples.

    spread = (max - min) / median (0 for one round or a zero median). The warning names every field of
    ``warn`` ({field: label}) whose spread exceeds ``limit``, with its range; other fields (a latency, a
    small difference of two times, is noisy by nature) are reported, not warned about."""
    medians, spreads, wide = {}, {}, []
    for field, xs in samples.items():
        med = statistics.median(xs)
        spreads[field] = (max(xs) - min(xs)) / med if med > 0 else 0.0
        medians[field] = med
        if field in warn and spreads[field] > limit:
            wide.append(f"{warn[field]} {min(xs):.4g}-{max(xs):.4g} (spread {spreads[field]:.0%})")
    warning = None
    if wide:
        n = len(next(iter(samples.values())))
        warning = (f"warning: timings varied widely over {n} rounds: {'; '.join(wide)}; the medians are written, "
                   f"but this machine was busy or throttling: profile it again when idle, or with more --rounds")
    return medians, spreads, warning


def measure_copy(numel: int, dtype: torch.dtype, device: torch.device, repeats: int = 10) -> tuple[float, float]:
    """(bandwidth GB/s, latency us) of one copy engine for a flat buffer of ``numel`` elements."""
    pin = device.type == "cuda"
    small_numel = max(1, 4096 // torch.empty((), dtype=dtype).element_size())
    src = torch.empty(numel, dtype=dtype, pin_memory=pin).fill_(1)
    dst = torch.empty(numel, dtype=dtype, device=device)
    dst.fill_(0)  # touch every page before timing
    engine = make_copy_engine(1, device)
    times = {}
    try:
        for n in (small_numel, numel):
            durations = []
            for i in range(repeats + 1):
                t0 = time.perf_counter()
                engine.submit(0, src[:n], dst[:n], demand=True)
                engine.wait(0)
                t1 = time.perf_counter()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # CPU waits on the GPU: the copy's events must be complete
                engine.poll()
                if i:  # the first is a warm-up
                    r = engine.records[-1]
                    # What a miss costs the compute: on CUDA the copy's own span on the GPU timeline
                    # (the compute stream waits on its event); on CPU the round trip from submit to
                    # the end of wait, which includes the hand-off to and from the copy thread.
                    durations.append(r.end_s - r.start_s if device.type == "cuda" else t1 - t0)
            times[n] = statistics.median(durations)
    finally:
        engine.close()
    elem = torch.empty((), dtype=dtype).element_size()
    big, small = numel * elem, small_numel * elem
    dt = times[numel] - times[small_numel]
    bw = (big - small) / dt if dt > 0 else big / times[numel]
    latency = max(times[small_numel] - small / bw, 0.0)
    return bw / 1e9, latency * 1e6


def measure_handoff(device: torch.device, repeats: int = 50) -> float:
    """Microseconds a demand copy costs the compute beyond the copy itself (CPU: the copy thread's
    hand-off there and back, median of small copies; CUDA: 0, the compute stream waits on an event)."""
    if device.type == "cuda":
        return 0.0
    src, dst = torch.ones(64), torch.zeros(64)
    engine = make_copy_engine(1, device)
    out = []
    try:
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            engine.submit(0, src, dst, demand=True)
            engine.wait(0)
            t1 = time.perf_counter()
            engine.poll()
            r = engine.records[-1]
            if i:
                out.append((t1 - t0) - (r.end_s - r.start_s))
    finally:
        engine.close()
    return max(statistics.median(out), 0.0) * 1e6


class _NullLink:
    """Copies that complete when the next layer begins: the protocol's host work, without bytes."""

    def __init__(self, cache) -> None:
        self.cache, self.loading = cache, []

    def withdraw(self, slot: int) -> bool:
        return False

    def demand(self, slot: int, key) -> None:
        self.loading.append(slot)

    def promote(self, slot: int) -> None:
        pass

    def prefetch(self, slot: int, key) -> None:
        self.loading.append(slot)

    def settle(self) -> None:
        for slot in self.loading:
            self.cache.copy_done(slot)
        self.loading.clear()


def measure_protocol(n_layers: int, n_experts: int, top_k: int, steps: int = 300,
                     predictors=("history", "popularity", "oracle"), seed: int = 0) -> tuple[float, dict]:
    """(host_layer_us, predictor_us): the LayerProtocol's host time per layer on random routing.

    host_layer_us: per layer with misses, at a 25% budget without prediction, less an all-hit layer.
    predictor_us[name][lookahead]: per layer, the same run with the predictor less without it.
    """
    import numpy as np

    from moe_runtime.core.expert_cache import ExpertCache
    from moe_runtime.core.protocol import LayerProtocol
    from moe_runtime.predictors import PredictorOptions, make_predictor

    rng = np.random.default_rng(seed)
    routing = [[sorted(rng.choice(n_experts, top_k, replace=False).tolist()) for _ in range(n_layers)]
               for _ in range(steps)]

    def per_layer(n_slots: int, predictor: str, lookahead: int) -> tuple[float, int]:
        """(seconds per layer, layers with misses), best of 3."""
        best, missed = float("inf"), 0
        for _ in range(3):
            cache = ExpertCache(n_slots=n_slots, n_moe_layers=n_layers, n_experts=n_experts, experts_per_layer=top_k,
                                expert_bytes=1, policy="lru", max_inflight=4)
            link = _NullLink(cache)
            pred = make_predictor(predictor, PredictorOptions(n_moe_layers=n_layers, n_experts=n_experts, top_k=top_k,
                                                              lookahead=lookahead))
            proto = LayerProtocol(cache, link, pred)
            missed = 0
            t0 = time.perf_counter()
            for step in routing:
                proto.begin_step(future=step.__getitem__)
                for layer, ids in enumerate(step):
                    link.settle()
                    if proto.layer(layer, ids):
                        missed += 1
                    proto.end_layer()
                proto.end_step()
            best = min(best, (time.perf_counter() - t0) / (steps * n_layers))
        return best, missed

    total = n_layers * n_experts
    hit, _ = per_layer(total, "none", 1)  # after the first step every layer hits
    base, missed = per_layer(max(total // 4, top_k + 4), "none", 1)
    host_us = max(base - hit, 0.0) * steps * n_layers / max(missed, 1) * 1e6
    pred_us = {}
    for name in predictors:
        pred_us[name] = {}
        for la in range(1, max(1, min(4, n_layers - 1)) + 1):
            t, _ = per_layer(max(total // 4, top_k + 4), name, la)
            pred_us[name][la] = round(max(t - base, 0.0) * 1e6, 2)
    return host_us, pred_us


def measure_hbm(device: torch.device, nbytes: int = _HBM_BYTES) -> float:
    """Device-memory GB/s of a large on-device copy (bytes read plus bytes written)."""
    a = torch.ones(nbytes // 4, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        b.copy_(a)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def measure_tflops(device: torch.device, n: int = 1024) -> float:
    """Dense matmul TFLOP/s (bf16 on CUDA, float32 on CPU)."""
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def resident_cache(model, store, device: torch.device, pool=None) -> OffloadedExperts:
    """An offloading provider whose budget holds every expert (the executor's path with no copy to wait for),
    assembled as every run is (``session.build_run``); ``pool`` lends its slot memory."""
    return build_run(model, store, OffloadOptions(budget="100%"), device=device, pool=pool).provider


def warm_every_expert(provider: OffloadedExperts, store) -> None:
    """One demand copy of every expert into a provider whose budget holds them all (then every access
    hits): a step of its own, top-k experts at a time."""
    provider.begin_step(0, 1)
    for m in range(store.n_moe_layers):
        for first in range(0, store.n_experts, store.top_k):
            provider.experts(m, list(range(first, min(first + store.top_k, store.n_experts))), None)
            provider.end_layer(m)


@torch.no_grad()  # not inference_mode: the copy thread writes the slot pool made here
def measure_layer_compute(model, store, device: torch.device, steps: int = 32, pool=None) -> float:
    """Milliseconds per MoE layer of one decode step through the offloading executor, all experts hit (median).

    The provider holds every expert and is warmed first, so no copy happens; what
    is timed is the forward pass plus the executor's per-layer bookkeeping, which
    every offloaded layer pays on top of the copies the simulator models. ``pool``: slot memory to
    reuse (a caller that holds one already need not allocate every expert twice).
    """
    provider = resident_cache(model, store, device, pool)
    try:
        warm_every_expert(provider, store)
        model.setup_cache(steps + 2)
        cur = torch.ones(1, dtype=torch.long, device=device)
        pos = torch.zeros(1, dtype=torch.long, device=device)
        times = []
        for s in range(steps + 1):
            pos.fill_(s)
            provider.begin_step(s, 1)
            _sync(device)
            t0 = time.perf_counter()
            model(cur, pos, provider, last_only=True)
            _sync(device)
            if s:  # the first is a warm-up
                times.append(time.perf_counter() - t0)
    finally:
        provider.engine.close()
    return statistics.median(times) / store.n_moe_layers * 1e3


@contextlib.contextmanager
def running_beside(work):
    """Run ``work()`` again and again on a thread for the duration of the block (the last call finishes
    before the block is left)."""
    stop = threading.Event()

    def work_forever() -> None:
        while not stop.is_set():
            work()
    worker = threading.Thread(target=work_forever, daemon=True)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join()


def measure_copy_slowdown(model, store, device: torch.device, pool=None, rounds: int = 2, link=None) -> float:
    """How much longer a MoE layer's compute takes while the link moves experts non-stop, as a fraction
    (CPU: the copy thread, or the reader threads, share the cores and memory bandwidth; 0 on CUDA, whose
    copies are DMA). ``link``: one burst of the link's work, run again and again beside the compute
    (default: one expert copied by the copy engine). Best of ``rounds`` interleaved measurements of each,
    so a slow spell does not count as either."""
    if device.type == "cuda":
        return 0.0
    engine = None
    if link is None:
        src = store.layer_buffer(0)[0]  # one expert, as the executor copies them
        dst = torch.empty_like(src).fill_(0)
        engine = make_copy_engine(1, device)

        def link() -> None:
            engine.submit(0, src, dst, demand=False)
            engine.wait(0)
    alone = busy = float("inf")
    try:
        for _ in range(rounds):
            alone = min(alone, measure_layer_compute(model, store, device, pool=pool))
            with running_beside(link):
                busy = min(busy, measure_layer_compute(model, store, device, pool=pool))
    finally:
        if engine is not None:
            engine.close()
    return max(busy / alone - 1.0, 0.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CPU waits on the GPU so the timer measures finished work


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def peak_bytes(cfg, dtype: torch.dtype) -> int:
    """What a profile run holds at its peak, from shapes alone: the dense weights, the experts twice
    (the host store and measure_layer_compute's slot for every expert), the copy and HBM buffers."""
    from moe_runtime.model.experts import ExpertLayout
    from moe_runtime.model.transformer import Transformer

    with torch.device("meta"):  # shapes only, nothing allocated
        dense = sum(t.numel() for t in Transformer(cfg).state_dict().values())
    item = torch.empty((), dtype=dtype).element_size()
    expert = ExpertLayout(cfg.hidden_size, cfg.moe_intermediate_size, dtype).nbytes
    return dense * item + (2 * cfg.n_moe_layers * cfg.n_experts + 2) * expert + 2 * _HBM_BYTES
