"""Host expert compute: how fast this machine's CPU runs one SwiGLU expert per format and batch with the
executor's own host kernels, against its memory bandwidth (the host profile's numbers; configs/hosts/ cite it).

    python3 benchmarks/host_experts.py [--hidden 2048 --intermediate 1408] [--batches 1,2,4,8,16,32] [--json]

Per (format, batch) it times ``host_forward`` (model/host_experts.py: what the executor runs for an expert
computed on the host) on an expert of DeepSeek-V2-Lite's shape (default), the best of ``--reps`` after a
warm-up, each call on another copy of the weights (256 MiB of copies, so they come from DRAM), and a
``memcpy`` of the fp32 expert's size (bytes read plus written per second, STREAM's copy convention): the
microseconds per expert, effective GB/s of the stored weights, GFLOP/s, and efficiency = GB/s / memcpy GB/s
(``moe_runtime/offload/host_bench.py``). ``int4`` rows are the exact block path (a CPU run
from the model's own int4 copy); ``int4-kernel`` rows time torch's CPU int4 kernel on the expert repacked
into its layout (``int4_packed``), which the executor runs for int4 host experts of a GPU run or of a
``--host-dtype int4`` copy. ``--json`` prints one object: memcpy_gbps, rows, and which format
is fastest at each batch.

Host profiles from the table (no number in configs/hosts is typed by hand)::

    python3 benchmarks/host_experts.py --json > m.json       # (several runs may be merged: --from a --from b)
    python3 benchmarks/host_experts.py --from m.json --host-yaml out/ddr5-desktop.yaml \
        --name ddr5-desktop --dimm-gbps 89.6 --source "..."   # nominal: cited DIMM GB/s x measured efficiency
    python3 benchmarks/host_experts.py --from m.json --host-yaml out/this-host.yaml --name this-host  # measured

(`moe-runtime profile --host-out FILE` writes the measured profile of the machine it runs on in one step.)
"""

from __future__ import annotations

import argparse
import json

import torch

from moe_runtime.model.formats import DenseExpert
from moe_runtime.model.host_experts import Int4Packed, host_forward, int4_packed, uses_int4_kernel
from moe_runtime.offload.host_bench import CODECS, POOL_BYTES, best_of, expert_format, host_profile_yaml, \
    measure_host


def int4_kernel_rows(H: int, I: int, batches, reps: int, mem: float) -> list[dict]:
    """Rows of torch's CPU int4 kernel on int4 experts repacked into its layout (``int4_packed``), bfloat16
    activations: what the executor runs for an int4 expert on the host of a GPU run or a --host-dtype copy."""
    fmt = expert_format("int4", H, I)
    if not uses_int4_kernel(fmt, "cuda", True):
        return []
    flat = torch.empty(fmt.numel, dtype=fmt.dtype)
    fmt.pack(flat, DenseExpert(torch.randn(I, H) * 0.02, torch.randn(I, H) * 0.02, torch.randn(H, I) * 0.02))
    one = int4_packed(fmt, fmt.views(flat))
    n = max(2, POOL_BYTES // fmt.nbytes)
    copies = [Int4Packed(*((p.clone(), z.clone()) for p, z in one[:3]), None) for _ in range(n)]
    it = iter(range(1 << 30))
    rows, flops = [], 2 * 3 * H * I
    for b in batches:
        x = torch.randn(b, H).to(fmt.compute_dtype)
        with torch.inference_mode():
            s = best_of(lambda: host_forward(fmt, x, copies[next(it) % n]), reps)
        gbps = fmt.nbytes / s / 1e9
        rows.append({"format": "int4-kernel", "batch": b, "us": s * 1e6, "expert_bytes": fmt.nbytes, "gbps": gbps,
                     "gflops": b * flops / s / 1e9, "efficiency": gbps / mem})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--formats", default=",".join(CODECS), help="expert codecs (float32, bfloat16, ..., mxfp4)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--from", dest="runs", action="append", help="write a host profile from these --json outputs")
    ap.add_argument("--host-yaml", help="with --from: the host profile to write")
    ap.add_argument("--name", help="with --from: the profile's name")
    ap.add_argument("--dimm-gbps", type=float, help="with --from: a nominal host's cited DIMM GB/s")
    ap.add_argument("--source", help="with --from: where the DIMM bandwidth is cited from")
    a = ap.parse_args()
    if a.runs:
        from moe_runtime.core.outputs import write_text_atomic
        runs = [json.load(open(p)) for p in a.runs]
        for run in runs:  # the profile's formats are the executor's; the kernel comparison rows stay out
            run["rows"] = [r for r in run["rows"] if r["format"] != "int4-kernel"]
        write_text_atomic(a.host_yaml, host_profile_yaml(runs, a.name, a.dimm_gbps, a.source))
        print(f"wrote {a.host_yaml}")
        return
    batches = [int(b) for b in a.batches.split(",")]
    out = measure_host(a.hidden, a.intermediate, a.formats.split(","), batches, a.reps)
    out["rows"] += int4_kernel_rows(a.hidden, a.intermediate, batches, a.reps, out["memcpy_gbps"])
    out["fastest"] = {b: min((r for r in out["rows"] if r["batch"] == b), key=lambda r: r["us"])["format"]
                      for b in batches}
    if a.json:
        print(json.dumps(out, indent=1))
        return
    print(f"memcpy {out['memcpy_gbps']:.2f} GB/s; expert {a.hidden}x{a.intermediate} SwiGLU; {out['threads']} "
          f"threads; torch {torch.__version__}; kernels: {out['kernels']}")
    print(f"{'format':<11} {'batch':>5} {'us':>9} {'GB/s':>7} {'GFLOP/s':>8} {'eff':>6}")
    for r in out["rows"]:
        print(f"{r['format']:<11} {r['batch']:>5} {r['us']:>9.0f} {r['gbps']:>7.2f} {r['gflops']:>8.2f} "
              f"{r['efficiency']:>6.3f}")
    print("fastest: " + ", ".join(f"batch {b}: {f}" for b, f in out["fastest"].items()))


if __name__ == "__main__":
    main()
