"""Host expert compute: how fast this machine's CPU runs one SwiGLU expert per format and batch, against its
memory bandwidth (the host profile's numbers; configs/hosts/ cite this table).

    python3 benchmarks/host_experts.py [--hidden 2048 --intermediate 1408] [--batches 1,2,4,8,16,32] [--json]

For each format it times ``silu(x W1^T) * (x W3^T) W2^T`` on an expert of DeepSeek-V2-Lite's shape (default)
at each batch (tokens), the best of ``--reps`` after a warm-up, each call on another copy
of the weights (256 MiB of copies in all, so they come from DRAM, not the cache), and a ``memcpy`` of a buffer of the fp32 expert's
size (the host's measured bandwidth: bytes read plus written per second, STREAM's copy convention). Per (format, batch): microseconds per expert,
effective GB/s of the expert's stored weights, GFLOP/s, and the efficiency = GB/s / memcpy GB/s.

Formats (a first version: the executor's own host kernels replace these when they land):
- fp32, bf16, fp16: ``F.linear`` on the weights as stored;
- int4: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (group-wise int4, group 32, bf16 activations) where
  this torch build has it;
- int8 (group 32, fp16 scales) and mxfp4 (e2m1 in blocks of 32, E8M0 scales): dequantized 256 rows at a time
  to bf16 and multiplied (``blockwise_expert``), never the whole expert.
``--json`` prints one object: memcpy_gbps, rows, and which format is fastest at each batch.

Host profiles from the table (configs/hosts/ are written so; no number in them is typed by hand)::

    python3 benchmarks/host_experts.py --json > m.json       # (several runs may be merged: --from a --from b)
    python3 benchmarks/host_experts.py --from m.json --host-yaml configs/hosts/ddr5-desktop.yaml \
        --name ddr5-desktop --dimm-gbps 89.6 --source "..."   # nominal: cited DIMM GB/s x measured efficiency
    python3 benchmarks/host_experts.py --from m.json --host-yaml out/this-host.yaml --name this-host  # measured

A nominal host's throughput per (format, batch) is the cited DIMM bandwidth x min(1, efficiency), its
GFLOP/s scaled alike (the same time); capped at 1 so it is never faster than bytes / bandwidth. A measured
profile keeps the measured numbers, capped at the measured memcpy bandwidth likewise.
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


ROWS = 256  # rows dequantized at once: a block of bf16 weights that stays in cache, never the whole expert
_FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def blockwise_expert(fmt: str, H: int, I: int):
    """int8 (group 32, fp16 scales) or mxfp4 (blocks of 32 e2m1 values, one power-of-two scale): each matrix
    dequantized ``ROWS`` rows at a time into bf16 and multiplied, so no whole expert is ever dequantized."""
    group = 32

    def make(n, k):
        if fmt == "int8":
            return torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n, k // group, dtype=torch.float16)
        return torch.randint(0, 256, (n, k // 2), dtype=torch.uint8), torch.randint(120, 130, (n, k // group),
                                                                                    dtype=torch.uint8)
    lut = _FP4.to(torch.bfloat16)

    def dequant(q, sc, a, b):
        if fmt == "int8":
            w = q[a:b].to(torch.bfloat16).view(b - a, -1, group) * sc[a:b, :, None].to(torch.bfloat16)
        else:
            qb = q[a:b]
            v = torch.stack((lut[(qb & 15).long()], lut[(qb >> 4).long()]), -1).view(b - a, -1, group)
            w = v * torch.exp2(sc[a:b].to(torch.float32) - 127).to(torch.bfloat16)[:, :, None]
        return w.view(b - a, -1)

    def mm(x, q, sc):  # x [T, k] @ W^T, W [n, k] given quantized
        n = q.shape[0]
        return torch.cat([x @ dequant(q, sc, a, min(a + ROWS, n)).T for a in range(0, n, ROWS)], dim=1)
    per_weight = 1 + 2 / group if fmt == "int8" else 0.5 + 1 / group
    nbytes = int(3 * H * I * per_weight)
    copies = [(make(I, H), make(I, H), make(H, I)) for _ in range(max(2, POOL_BYTES // nbytes))]
    it = iter(range(1 << 30))

    def run(x):
        w1, w3, w2 = copies[next(it) % len(copies)]
        return mm(F.silu(mm(x, *w1)) * mm(x, *w3), *w2)
    return run, nbytes, torch.bfloat16


def host_yaml(runs: list[dict], name: str, dimm_gbps: float | None, source: str | None) -> str:
    """A host profile (configs/hosts schema) from measurement runs: per format the rows of the run that measured it."""
    rows = {}
    for run in runs:
        for r in run["rows"]:
            rows[r["format"], r["batch"]] = (r, run)
    nominal = dimm_gbps is not None
    lines = [f"# Host profile written by benchmarks/host_experts.py from {len(runs)} measurement run(s) on this "
             "machine; do not edit by hand.",
             "# " + ("nominal: per (format, batch) GB/s = the cited DIMM bandwidth x min(1, measured expert GB/s / "
                     "measured memcpy GB/s); GFLOP/s scaled alike" if nominal else
                     "measured: the expert GB/s and GFLOP/s measured here, capped at the memcpy bandwidth"),
             f"name: {name}", f"nominal: {'true' if nominal else 'false'}"]
    mem = dimm_gbps if nominal else max(run["memcpy_gbps"] for run in runs)
    lines.append(f"memory_bandwidth_gbps: {mem:.2f}")
    lines.append(f"threads: {runs[0]['threads']}")
    lines.append("formats:")
    meas = []
    for fmt in ("bf16", "fp16", "fp32", "int8", "int4", "mxfp4"):
        batches = sorted(b for f, b in rows if f == fmt)
        if not batches:
            continue
        lines.append(f"  {fmt}:")
        for b in batches:
            r, run = rows[fmt, b]
            eff = min(1.0, r["efficiency"])
            gbps = (dimm_gbps * eff) if nominal else min(r["gbps"], run["memcpy_gbps"])
            gflops = r["gflops"] * gbps / r["gbps"]
            lines.append(f"    {b}: {{gbps: {gbps:.3f}, gflops: {gflops:.3f}}}")
            meas.append(f"{fmt}@{b}: {r['us']:.0f} us, {r['gbps']:.2f} GB/s, eff {r['efficiency']:.3f}")
    if source:
        lines.append(f"source: {json.dumps(source)}")
    memcpy = ", ".join(f"{run['memcpy_gbps']:.2f}" for run in runs)
    lines.append("measurement: " + json.dumps(
        f"benchmarks/host_experts.py on {runs[0]['machine']} ({runs[0]['threads']} threads, torch "
        f"{runs[0]['torch']}), expert {runs[0]['hidden']}x{runs[0]['intermediate']}; memcpy {memcpy} GB/s; "
        + "; ".join(meas)))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--formats", default="fp32,bf16,fp16,int8,int4,mxfp4")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--from", dest="runs", action="append", help="write a host profile from these --json outputs")
    ap.add_argument("--host-yaml", help="with --from: the host profile to write")
    ap.add_argument("--name", help="with --from: the profile's name")
    ap.add_argument("--dimm-gbps", type=float, help="with --from: a nominal host's cited DIMM GB/s")
    ap.add_argument("--source", help="with --from: where the DIMM bandwidth is cited from")
    a = ap.parse_args()
    if a.runs:
        from moe_runtime.core.outputs import write_text_atomic
        text = host_yaml([json.load(open(p)) for p in a.runs], a.name, a.dimm_gbps, a.source)
        write_text_atomic(a.host_yaml, text)
        print(f"wrote {a.host_yaml}")
        return
    H, I = a.hidden, a.intermediate
    batches = [int(b) for b in a.batches.split(",")]
    mem = memcpy_gbps(3 * H * I * 4, a.reps)
    flops_per_token = 2 * 3 * H * I
    want = a.formats.split(",")
    makers = {"fp32": lambda: plain_expert(torch.float32, H, I), "bf16": lambda: plain_expert(torch.bfloat16, H, I),
              "fp16": lambda: plain_expert(torch.float16, H, I), "int8": lambda: blockwise_expert("int8", H, I),
              "int4": lambda: int4_expert(H, I), "mxfp4": lambda: blockwise_expert("mxfp4", H, I)}
    kernels = {}
    for f in want:
        k = makers[f]()
        if k is not None:  # int4: only where this torch build has the kernel
            kernels[f] = k
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
