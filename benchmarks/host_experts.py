"""Host expert compute: how fast this machine's CPU runs one SwiGLU expert per format and batch with the
executor's own host kernels, against its memory bandwidth (the host profile's numbers; configs/hosts/ cite it).

    python3 benchmarks/host_experts.py [--hidden 2048 --intermediate 1408] [--batches 1,2,4,8,16,32] [--json]

Per (format, batch) it times ``host_forward`` (model/host_experts.py: what the executor runs for an expert
computed on the host) on an expert of DeepSeek-V2-Lite's shape (default), the best of ``--reps`` after a
warm-up, each call on another copy of the weights (256 MiB of copies, so they come from DRAM), and a
``memcpy`` of the fp32 expert's size (bytes read plus written per second, STREAM's copy convention): the
microseconds per expert, effective GB/s of the stored weights, GFLOP/s, and efficiency = GB/s / memcpy GB/s
(``moe_runtime/offload/host_bench.py``). Beside them, ``int4-kernel`` rows time torch's CPU int4 kernel
(``_weight_int4pack_mm_for_cpu``) on the same expert repacked into its layout (``int4_pack``): what an int4
host copy kept in that layout would run. ``--json`` prints one object: memcpy_gbps, rows, and which format
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
import torch.nn.functional as F

from moe_runtime.model.formats import unpack_int4
from moe_runtime.model.host_experts import int4_kernel, int4_pack
from moe_runtime.offload.host_bench import CODECS, POOL_BYTES, best_of, expert_format, host_profile_yaml, \
    measure_host


def int4_kernel_rows(H: int, I: int, batches, reps: int, mem: float) -> list[dict]:
    """Rows of torch's CPU int4 kernel on an int4 expert repacked into its layout (empty where this build lacks
    it)."""
    if getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None) is None:
        return []
    fmt = expert_format("int4", H, I)
    flat = torch.randint(0, 256, (fmt.numel,), dtype=torch.uint8)
    v = fmt.views(flat)
    for k in v:  # scales as float16 of a plausible size (random bytes would hold NaNs)
        if k.endswith(".scale"):
            v[k].view(torch.float16).copy_(torch.rand(v[k].view(torch.float16).shape) * 0.01)
    try:
        mats = [int4_pack(v[f"{n}.q"], v[f"{n}.scale"].view(torch.float16)) for n in ("w1", "w3", "w2")]
    except RuntimeError:
        return []
    assert unpack_int4(v["w1.q"]).shape[-1] >= H
    n = max(2, POOL_BYTES // fmt.nbytes)
    copies = [[(p.clone(), s.clone()) for p, s in mats] for _ in range(n)]
    it = iter(range(1 << 30))

    def run(x):
        (p1, s1), (p3, s3), (p2, s2) = copies[next(it) % n]
        return int4_kernel(F.silu(int4_kernel(x, p1, s1)) * int4_kernel(x, p3, s3), p2, s2)
    rows, flops = [], 2 * 3 * H * I
    for b in batches:
        x = torch.randn(b, H)
        with torch.inference_mode():
            s = best_of(lambda: run(x), reps)
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
