"""What binding a pack to its checkpoint costs (docs/executor.md, "A pack is bound to the checkpoint").

1. The open-time digest (``packed.weights_digest``) of 512 MiB of non-expert
   float32 tensors, in the page cache as a run that has just loaded them finds
   them: the best of 3.
2. Reading every record of a pack of 48 x 4 MiB records twice through
   ``storage.DiskReadEngine`` (4 threads, 4 in flight): with the first-read
   CRC check and without; rounds interleaved, the median of 3. The first pass
   pays the CRC, the second must not.

    PYTHONPATH=. python3 benchmarks/pack_identity.py     # ~30 s; writes ~0.8 GB under ./
"""

from __future__ import annotations

import shutil
import tempfile
import time

import numpy as np
import torch
from safetensors.torch import save_file

from moe_runtime.offload.packed import SafetensorsLayout, read_header, weights_digest, write_packed
from moe_runtime.offload.storage import DiskReadEngine, aligned_pool

R, N, DEPTH = 4 << 20, 48, 4


def digest_cost(d: str) -> str:
    t = {f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(4096, 4096) for i in range(8)}
    t["model.layers.0.block_sparse_moe.experts.0.w1.weight"] = torch.randn(1024, 1024)  # skipped: an expert
    save_file(t, f"{d}/model.safetensors")
    lay = SafetensorsLayout(d)
    nbytes = sum(end - start for n, (_, start, end, *_) in lay.tensors.items() if ".experts." not in n)
    weights_digest(lay)  # warm, as after loading
    best = min(_timed(lambda: weights_digest(lay)) for _ in range(3))
    return f"weights_digest: {nbytes / 2**20:.0f} MiB in {best:.3f} s = {nbytes / best / 1e9:.2f} GB/s (best of 3)"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def read_twice(path: str, segs, verify: bool) -> tuple[float, float, str]:
    pool = aligned_pool(DEPTH, R, torch.uint8)
    eng = DiskReadEngine(DEPTH, [path], threads=DEPTH, max_read=R, verify=verify)

    def one_pass() -> None:
        for i in range(0, N, DEPTH):
            for s in range(DEPTH):
                eng.submit(s, segs[i + s], pool[s], demand=False)
            for s in range(DEPTH):
                eng.wait(s)
    try:
        return _timed(one_pass), _timed(one_pass), eng.mode
    finally:
        eng.close()


def main() -> None:
    d = tempfile.mkdtemp(dir=".")
    try:
        print(digest_cost(d))
        write_packed(f"{d}/p.pack", fingerprint="x", dtype="uint8", record_bytes=R, n_moe_layers=1, n_experts=N,
                     layers=[np.random.randint(0, 255, (N, R), dtype=np.uint8)])
        hdr = read_header(f"{d}/p.pack")
        segs = [hdr.segments(0, e) for e in range(N)]
        runs: dict[bool, list] = {False: [], True: []}
        for _ in range(3):
            for verify in (False, True):
                runs[verify].append(read_twice(hdr.path, segs, verify))
        for verify, rs in runs.items():
            first, second = (sorted(r[k] for r in rs)[1] for k in (0, 1))
            print(f"CRC check {'on ' if verify else 'off'}: first pass {N * R / first / 1e9:.2f} GB/s, second pass "
                  f"{N * R / second / 1e9:.2f} GB/s ({rs[0][2]} I/O, {N} x {R >> 20} MiB records, median of 3)")
    finally:
        shutil.rmtree(d)


if __name__ == "__main__":
    main()
