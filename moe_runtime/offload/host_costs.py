"""The executor's inputs to the miss policy's cost rule (``core/protocol.HostCost``), for one model on one
machine: the host's time for one expert at n tokens, one expert's copy, and the device's time for one expert.

Contract: ``host_costs(store, device, host_profile)`` returns (``HostCost``, a line saying where the figures
came from). The copy and the device's compute are always measured here, on the run's own expert format and
device, since the device profile of the simulator does not describe this process's device. The host's
compute comes from ``host_profile`` (a name in configs/hosts or a YAML file) when given, else from a short
measurement of ``host_forward`` on one expert: ``MEASURE_BATCHES`` batch sizes, the median of ``REPEATS``
runs each after a warm-up (a few milliseconds for a real model's expert; the line states the time it took).
Between and beyond the measured batches the time is linear in n. This module reads no flags.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from moe_runtime.core.host_profile import load_host
from moe_runtime.core.protocol import HostCost
from moe_runtime.model.experts import HostExpertStore
from moe_runtime.model.host_experts import host_forward, host_weights, uses_int4_kernel

MEASURE_BATCHES = (1, 16)
REPEATS = 5


def _median_s(fn: Callable[[], object], device: torch.device) -> float:
    """Median seconds of ``fn`` over REPEATS runs after one warm-up (CUDA: synchronized around each run)."""
    cuda = device.type == "cuda"
    times = []
    for i in range(REPEATS + 1):
        if cuda:
            torch.cuda.synchronize(device)  # CPU waits on the GPU: time this run alone
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _linear(points: dict[int, float]) -> Callable[[int], float]:
    """Seconds at n tokens through the measured (batch, seconds) points; never below the first point."""
    (n0, t0), (n1, t1) = sorted(points.items())
    slope = max((t1 - t0) / (n1 - n0), 0.0)
    memo: dict[int, float] = {}

    def at(n: int) -> float:
        v = memo.get(n)
        if v is None:
            v = memo[n] = t0 + slope * max(n - n0, 0)
        return v
    return at


def host_costs(store: HostExpertStore, device: torch.device, host_profile: str | None,
               host_store: HostExpertStore | None = None) -> tuple[HostCost, str]:
    """(the cost rule's inputs, where they came from) for ``store``'s experts on ``device``, the host computing
    from ``host_store``'s copies (default: ``store``'s); see the module docstring. The stores must hold their
    experts (host compute reads them)."""
    t_start = time.perf_counter()
    fmt, device = store.layout, torch.device(device)
    flat = store.flat(0, 0)
    slot = torch.empty_like(flat, device=device)
    copy_s = _median_s(lambda: slot.copy_(flat, non_blocking=True), device)
    w_dev = fmt.views(slot)
    x = torch.randn(max(MEASURE_BATCHES), fmt.hidden_size, dtype=fmt.compute_dtype)
    x_dev = x.to(device)
    device_s = _linear({n: _median_s(lambda n=n: fmt.forward(x_dev[:n], w_dev), device) for n in MEASURE_BATCHES})
    hfmt = (host_store or store).layout
    if host_profile is not None:
        spec = load_host(host_profile)
        spec.format_of(hfmt.codec)  # a profile without this format is refused here, before the run
        flops = 6 * fmt.hidden_size * fmt.intermediate_size  # three matrix-vector products per token
        memo: dict[int, float] = {}

        def host_s(n: int) -> float:
            v = memo.get(n)
            if v is None:
                v = memo[n] = spec.expert_seconds(hfmt.codec, hfmt.nbytes, flops, n)
            return v
        source = f"host profile {spec.name}"
    else:
        w_host = host_weights(hfmt, (host_store or store).weights(0, 0),
                              uses_int4_kernel(hfmt, device, host_store is not None))  # as the provider will
        host_s = _linear({n: _median_s(lambda n=n: host_forward(hfmt, x[:n], w_host), torch.device("cpu"))
                          for n in MEASURE_BATCHES})
        source = "host measured at start-up"
    ms = (time.perf_counter() - t_start) * 1e3
    line = (f"miss costs: {source}: host {host_s(1) * 1e3:.3f} ms per expert at 1 token; copy "
            f"{copy_s * 1e3:.3f} ms and device {device_s(1) * 1e3:.3f} ms measured ({ms:.0f} ms to measure)")
    return HostCost(host_s=host_s, copy_s=copy_s, device_s=device_s), line
