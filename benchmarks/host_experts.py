"""Host expert compute: how fast this machine's CPU runs one SwiGLU expert per format and batch, against its
memory bandwidth (the host profile's numbers; configs/hosts/ cite this table).

    python3 benchmarks/host_experts.py [--hidden 2048 --intermediate 1408] [--batches 1,2,4,8,16,32] [--json]

For each format it times ``silu(x W1^T) * (x W3^T) W2^T`` on an expert of DeepSeek-V2-Lite's shape (default)
at each batch (tokens), the best of ``--reps`` after a warm-up, each call on another copy
of the weights (256 MiB of copies in all, so they come from DRAM, not the cache), and a ``memcpy`` of a buffer of the fp32 expert's
size (the host's measured bandwidth: bytes read plus written per second, STREAM's copy convention). Per (format, batch): microseconds per expert,
effective GB/s of the expert's stored weights, GFLOP/s, and the efficiency = GB/s / memcpy GB/s.

Formats (first version; group-wise int8 and MXFP4 kernels with block-wise dequantization are the executor's,
and are added here when they land):
- fp32, bf16, fp16: ``F.linear`` on the weights as stored;
- int4: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (group-wise int4, group 32, bf16 activations) where
  this torch build has it.
``--json`` prints one object: memcpy_gbps, rows, and which format is fastest at each batch.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F


POOL_BYTES = 256 * 2**20  # weights cycled through, far above any last-level cache: every call reads DRAM


def best_of(fn, reps: int) -> float:
    """Fewest seconds of ``reps`` calls after one warm-up: on a shared machine a call that lost its core
    to another process takes a scheduler slice longer, so the minimum is the kernel's own time."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def memcpy_gbps(nbytes: int, reps: int) -> float:
    """Memory traffic per second of a buffer-to-buffer copy (bytes read + bytes written, STREAM's copy
    convention), cycling through copies that do not fit in cache."""
    n = max(2, POOL_BYTES // nbytes)
    src = [torch.empty(nbytes // 4, dtype=torch.float32).uniform_() for _ in range(n)]
    dst = torch.empty_like(src[0])
    it = iter(range(1 << 30))
    return 2 * nbytes / best_of(lambda: dst.copy_(src[next(it) % n]), reps) / 1e9


def plain_expert(dtype, H: int, I: int):
    nbytes = 3 * H * I * torch.empty(0, dtype=dtype).element_size()
    copies = [(torch.randn(I, H).to(dtype) * 0.02, torch.randn(I, H).to(dtype) * 0.02,
               torch.randn(H, I).to(dtype) * 0.02) for _ in range(max(2, POOL_BYTES // nbytes))]
    it = iter(range(1 << 30))

    def run(x):
        w1, w3, w2 = copies[next(it) % len(copies)]  # a different expert each call, as a decode reads them
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
    return run, nbytes, dtype


def int4_expert(H: int, I: int):
    op = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    conv = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if op is None or conv is None:
        return None
    group = 32

    def pack(n, k):
        q = torch.randint(0, 16, (n, k), dtype=torch.int32)
        scales = torch.rand(k // group, n, 2, dtype=torch.bfloat16) * 0.01  # [groups, n, (scale, zero)]
        return conv(q, 1), scales
    nbytes = 3 * H * I // 2 + 3 * H * I // group * 2 * 2
    copies = [(pack(I, H), pack(I, H), pack(H, I)) for _ in range(max(2, POOL_BYTES // nbytes))]
    it = iter(range(1 << 30))

    def run(x):
        (p1, s1), (p3, s3), (p2, s2) = copies[next(it) % len(copies)]
        a = op(x, p1, group, s1)
        b = op(x, p3, group, s3)
        return op(F.silu(a) * b, p2, group, s2)
    try:
        run(torch.randn(1, H, dtype=torch.bfloat16))
    except RuntimeError:
        return None
    return run, nbytes, torch.bfloat16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    H, I = a.hidden, a.intermediate
    batches = [int(b) for b in a.batches.split(",")]
    mem = memcpy_gbps(3 * H * I * 4, a.reps)
    flops_per_token = 2 * 3 * H * I
    kernels = {"fp32": plain_expert(torch.float32, H, I), "bf16": plain_expert(torch.bfloat16, H, I),
               "fp16": plain_expert(torch.float16, H, I)}
    k4 = int4_expert(H, I)
    if k4 is not None:
        kernels["int4"] = k4
    rows = []
    for fmt, (run, nbytes, dtype) in kernels.items():
        for b in batches:
            x = torch.randn(b, H).to(dtype)
            with torch.inference_mode():
                s = best_of(lambda: run(x), a.reps)
            gbps = nbytes / s / 1e9
            rows.append({"format": fmt, "batch": b, "us": s * 1e6, "expert_bytes": nbytes, "gbps": gbps,
                         "gflops": b * flops_per_token / s / 1e9, "efficiency": gbps / mem})
    fastest = {b: min((r for r in rows if r["batch"] == b), key=lambda r: r["us"])["format"] for b in batches}
    out = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "hidden": H, "intermediate": I, "memcpy_gbps": mem, "rows": rows,
           "fastest": fastest}
    if a.json:
        print(json.dumps(out, indent=1))
        return
    print(f"memcpy {mem:.2f} GB/s; expert {H}x{I} SwiGLU; {out['threads']} threads; torch {torch.__version__}")
    print(f"{'format':<6} {'batch':>5} {'us':>9} {'GB/s':>7} {'GFLOP/s':>8} {'eff':>6}")
    for r in rows:
        print(f"{r['format']:<6} {r['batch']:>5} {r['us']:>9.0f} {r['gbps']:>7.2f} {r['gflops']:>8.2f} "
              f"{r['efficiency']:>6.3f}")
    print("fastest: " + ", ".join(f"batch {b}: {f}" for b, f in fastest.items()))


if __name__ == "__main__":
    main()
