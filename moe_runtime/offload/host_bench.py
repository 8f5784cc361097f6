"""This host's expert compute, measured with the executor's own host kernels, and the host profile it makes.

Contract:

- ``memcpy_gbps(nbytes, reps)``: memory traffic per second of a buffer-to-buffer copy (bytes read plus
  written, STREAM's copy convention), cycling through ``POOL_BYTES`` of buffers so every copy reads DRAM.
- ``measure_host(hidden, intermediate, codecs, batches, reps)``: per expert codec and batch (tokens), the
  time of ``host_forward`` (model/host_experts.py: what the executor runs for a host-computed expert) on one
  SwiGLU expert of that shape, the best of ``reps`` calls after a warm-up, each call on another copy of the
  expert's bytes (``POOL_BYTES`` of copies: the weights come from DRAM, as a decode reads them). Rows give
  microseconds, the expert's GB/s and GFLOP/s, and the efficiency = GB/s / memcpy GB/s. Quantized codecs
  compute in bfloat16, as a bf16 model's experts would.
- ``host_profile_yaml(runs, name, dimm_gbps, source)``: a host profile (core/host_profile.py's schema) from
  one or more such measurements. Measured (``dimm_gbps`` None): the measured figures, capped at the memcpy
  bandwidth. Nominal: the cited DIMM bandwidth x min(1, measured efficiency), GFLOP/s scaled alike, so a
  nominal host is never faster than bytes / bandwidth. No number in a profile is typed by hand.

`moe-runtime profile --host-out FILE` and ``benchmarks/host_experts.py`` use these.
"""

from __future__ import annotations

import json
import platform
import time

import torch

from moe_runtime.core.host_profile import FORMATS
from moe_runtime.model.formats import DenseExpert, ExpertFormat
from moe_runtime.model.host_experts import host_forward

POOL_BYTES = 256 * 2**20  # copies cycled through, far above any last-level cache
CODECS = ("float32", "bfloat16", "float16", "int8", "int4", "mxfp4")
_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def best_of(fn, reps: int) -> float:
    """Fewest seconds of ``reps`` calls after one warm-up: on a shared machine a call that lost its core to
    another process takes a scheduler slice longer, so the minimum is the kernel's own time."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def memcpy_gbps(nbytes: int, reps: int) -> float:
    n = max(2, POOL_BYTES // nbytes)
    src = [torch.empty(nbytes // 4, dtype=torch.float32).uniform_() for _ in range(n)]
    dst = torch.empty_like(src[0])
    it = iter(range(1 << 30))
    return 2 * nbytes / best_of(lambda: dst.copy_(src[next(it) % n]), reps) / 1e9


def expert_format(codec: str, hidden: int, intermediate: int) -> ExpertFormat:
    """The executor's format of one SwiGLU expert stored as ``codec``."""
    if codec in _TORCH:
        return ExpertFormat(hidden, intermediate, _TORCH[codec])
    return ExpertFormat(hidden, intermediate, torch.uint8, codec=codec, compute_dtype=torch.bfloat16)


def _copies(fmt: ExpertFormat) -> list:
    """Views of ``POOL_BYTES / expert bytes`` copies of one random expert packed in ``fmt``."""
    H, I = fmt.hidden_size, fmt.intermediate_size
    flat = torch.empty(fmt.numel, dtype=fmt.dtype)
    fmt.pack(flat, DenseExpert(torch.randn(I, H) * 0.02, torch.randn(I, H) * 0.02, torch.randn(H, I) * 0.02))
    n = min(max(2, POOL_BYTES // fmt.nbytes), 4096)  # (a tiny test expert needs no more to leave the cache)
    bufs = flat.unsqueeze(0).repeat(n, 1)  # [n, numel]: the same bytes in n places
    return [fmt.views(bufs[i]) for i in range(n)]


def measure_host(hidden: int, intermediate: int, codecs=CODECS, batches=(1, 2, 4, 8, 16, 32),
                 reps: int = 25) -> dict:
    """The measurement described in the module docstring, as a JSON-ready dict."""
    mem = memcpy_gbps(3 * hidden * intermediate * 4, reps)
    flops = 2 * 3 * hidden * intermediate
    rows = []
    for codec in codecs:
        fmt = expert_format(codec, hidden, intermediate)
        copies = _copies(fmt)
        it = iter(range(1 << 30))
        for b in batches:
            x = torch.randn(b, hidden).to(fmt.compute_dtype)
            with torch.inference_mode():
                s = best_of(lambda: host_forward(fmt, x, copies[next(it) % len(copies)]), reps)
            gbps = fmt.nbytes / s / 1e9
            rows.append({"format": FORMATS[codec], "batch": b, "us": s * 1e6, "expert_bytes": fmt.nbytes,
                         "gbps": gbps, "gflops": b * flops / s / 1e9, "efficiency": gbps / mem})
        del copies
    fastest = {b: min((r for r in rows if r["batch"] == b), key=lambda r: r["us"])["format"] for b in batches}
    return {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "hidden": hidden, "intermediate": intermediate, "memcpy_gbps": mem,
            "kernels": "moe_runtime.model.host_experts.host_forward", "rows": rows, "fastest": fastest}


def host_profile_yaml(runs: list[dict], name: str, dimm_gbps: float | None = None, source: str | None = None) -> str:
    """A host profile from measurement runs (``measure_host`` dicts): per format the rows of the run that
    measured it last; see the module docstring for measured versus nominal."""
    rows = {}
    for run in runs:
        for r in run["rows"]:
            rows[r["format"], r["batch"]] = (r, run)
    nominal = dimm_gbps is not None
    lines = [f"# Host profile written from {len(runs)} measurement run(s) of the executor's host kernels "
             "(moe_runtime/offload/host_bench.py); do not edit by hand.",
             "# " + ("nominal: per (format, batch) GB/s = the cited DIMM bandwidth x min(1, measured expert GB/s / "
                     "measured memcpy GB/s); GFLOP/s scaled alike" if nominal else
                     "measured: the expert GB/s and GFLOP/s measured here, capped at the memcpy bandwidth"),
             f"name: {name}", f"nominal: {'true' if nominal else 'false'}"]
    mem = dimm_gbps if nominal else max(run["memcpy_gbps"] for run in runs)
    lines += [f"memory_bandwidth_gbps: {mem:.2f}", f"threads: {runs[0]['threads']}", "formats:"]
    meas = []
    for fmt in FORMATS.values():
        batches = sorted(b for f, b in rows if f == fmt)
        if not batches:
            continue
        lines.append(f"  {fmt}:")
        for b in batches:
            r, run = rows[fmt, b]
            gbps = dimm_gbps * min(1.0, r["efficiency"]) if nominal else min(r["gbps"], run["memcpy_gbps"])
            gflops = r["gflops"] * gbps / r["gbps"]
            lines.append(f"    {b}: {{gbps: {gbps:.3f}, gflops: {gflops:.3f}}}")
            meas.append(f"{fmt}@{b}: {r['us']:.0f} us, {r['gbps']:.2f} GB/s, eff {r['efficiency']:.3f}")
    if source:
        lines.append(f"source: {json.dumps(source)}")
    memcpy = ", ".join(f"{run['memcpy_gbps']:.2f}" for run in runs)
    lines.append("measurement: " + json.dumps(
        f"{runs[0].get('kernels', 'host kernels')} on {runs[0]['machine']} ({runs[0]['threads']} threads, torch "
        f"{runs[0]['torch']}), expert {runs[0]['hidden']}x{runs[0]['intermediate']}; memcpy {memcpy} GB/s; "
        + "; ".join(meas)))
    return "\n".join(lines) + "\n"
