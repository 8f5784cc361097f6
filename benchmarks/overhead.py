"""Host work per MoE layer: the offloading path against the all-resident one, on the CPU, one thread.

A synthetic model with Qwen3-30B-A3B's routing shape (128 experts, top-8; 4 MoE
layers) and hidden size 64, so that the host's work, not arithmetic, is what
is timed. "Host time" is wall time on the decode thread inside each MoE block
(router to combined output, the provider's bookkeeping included), averaged over
the MoE layers of single-token decode steps. Printed, as ratios measured in one
run (interleaved rounds, best round of each):

- host time per MoE layer: resident, offloaded at 100% warm (every expert
  brought onto the device through the provider first, so the timed steps are
  all hits; no prefetch; LRU and LFU) and with ``gate`` prefetch (lookahead 3); the provider's own time
  (``experts`` + ``end_layer`` + ``prepare``) as a share of
  the resident MoE layer (``provider_share``); offloaded over resident
  (``host_time_ratio``);
- tensor operations per MoE layer at top-2 and top-8 (torch functions called
  in a decode forward, per MoE layer, offloaded at 100%): since issue 22 the
  routed experts compute in place, one expert at a time from its slot's views
  (no gathered copy of their weights), so they grow by about 8 per routed
  expert;
- host reads of device tensors per MoE layer with ``gate`` at lookahead 3
  (``tolist``, ``item``, ``cpu``, ``numpy``, truth values: on CUDA each is a
  device-to-host sync).

On CUDA (skipped without a device): decode tokens/s of Qwen3-30B-A3B-shaped
layers (synthetic bf16 weights), resident vs offloaded at 100% warm, with and
without ``--cuda-graphs`` (``cuda`` in the JSON; target offloaded >= 0.97x).

Targets (issue 13): provider_share <= 0.10, host_time_ratio <= 1.15, one host read
per layer with gate at lookahead 3. (Issue 13's "top-8 minus top-2 ops <= 4" held for
the fixed-shape gather that issue 22 removed: it copied every routed expert's weights.)

    python benchmarks/overhead.py [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moe_runtime.core.shapes import load_model_spec  # noqa: E402
from moe_runtime.model.synthetic import config_from_spec, synthetic_model  # noqa: E402
from moe_runtime.core.options import OffloadOptions  # noqa: E402
from moe_runtime.offload.provider import OffloadedExperts  # noqa: E402
from moe_runtime.offload.session import build_run  # noqa: E402

READS = {"tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__"}


class Count(TorchFunctionMode):
    """Counts torch functions called (all, and host reads of tensor values)."""

    def __init__(self):
        super().__init__()
        self.ops = self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.reads += getattr(func, "__name__", "") in READS
        return func(*args, **(kwargs or {}))


class Timed:
    """Wraps a callable and adds its wall time to a counter (the benchmark's own instrument)."""

    def __init__(self, fn, acc: list):
        self.fn, self.acc = fn, acc

    def __call__(self, *a, **k):
        t = time.perf_counter()
        try:
            return self.fn(*a, **k)
        finally:
            self.acc[0] += time.perf_counter() - t


def build(top_k: int):
    spec = load_model_spec("qwen3-30b-a3b")
    cfg = config_from_spec(spec, 4)
    cfg = dataclasses.replace(cfg, hidden_size=64, head_dim=16, n_heads=4, n_kv_heads=2, moe_intermediate_size=32,
                              vocab_size=256, top_k=top_k)
    return synthetic_model(cfg, "cpu", torch.float32)


def provider_for(kind: str, model, store):
    if kind == "resident":
        return build_run(model, store, None, device="cpu").provider
    policy, pred = {"lru": ("lru", "none"), "lfu": ("lfu", "none"), "gate": ("lru", "gate")}[kind]
    opts = OffloadOptions(budget="100%", eviction=policy, predictor=pred, lookahead=3)
    return build_run(model, store, opts, device="cpu").provider


def warm(prov, store, hidden: int) -> None:
    """Bring every expert onto the device through the provider, top-k at a time, and drain the copies."""
    h = torch.zeros(1, hidden)
    prov.begin_step(-1, 1)
    for m in range(store.n_moe_layers):
        for a in range(0, store.n_experts, store.top_k):
            prov.experts(m, list(range(a, min(a + store.top_k, store.n_experts))), h)
            prov.end_layer(m)
    prov.flush()


def measure(model, store, kind: str, steps: int, count: bool = False) -> dict:
    """Decode ``steps`` single tokens (after a warm-up pass that fills the cache); per-MoE-layer figures."""
    prov = provider_for(kind, model, store)
    L = store.n_moe_layers
    moe_t, prov_t = [0.0], [0.0]
    for name in ("experts", "end_layer", "prepare"):
        setattr(prov, name, Timed(getattr(prov, name), prov_t))
    blocks = [model.moe_block(m) for m in range(L)]
    for block in blocks:  # the MoE block's three parts: routing, the host's fetch and experts, shared experts
        for name in ("select", "experts", "shared"):
            setattr(block, name, Timed(getattr(block, name), moe_t))
    model.setup_cache(2 * steps + 4)
    tokens = torch.randint(0, 256, (2 * steps,), generator=torch.Generator().manual_seed(0))
    counter = Count()
    if isinstance(prov, OffloadedExperts):  # warm: every expert resident (100% budget) before the first token
        warm(prov, store, model.cfg.hidden_size)
    try:
        for p in range(2 * steps):  # first pass fills the cache (100%: every expert then hits)
            if p == steps:
                moe_t[0] = prov_t[0] = 0.0
            prov.begin_step(p, 1)
            if count and p >= steps:
                with counter:
                    model(tokens[p: p + 1], torch.tensor([p]), prov, last_only=True)
            else:
                model(tokens[p: p + 1], torch.tensor([p]), prov, last_only=True)
    finally:
        for block in blocks:
            for name in ("select", "experts", "shared"):
                delattr(block, name)
        if isinstance(prov, OffloadedExperts):
            prov.finish()
    n = steps * L
    out = {"moe_us": moe_t[0] / n * 1e6, "provider_us": prov_t[0] / n * 1e6}
    if count:
        out.update(ops=counter.ops / n, reads=counter.reads / n)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cuda-layers", type=int, default=8, help="MoE layers of the CUDA decode (default 8)")
    p.add_argument("--cuda-tokens", type=int, default=64, help="tokens decoded per CUDA run (default 64)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, store = build(8)
    kinds = ("resident", "lru", "lfu", "gate")
    best: dict = {}
    for _ in range(args.rounds):  # interleaved; the fastest round of each counts
        for kind in kinds:
            r = measure(model, store, kind, args.steps)
            if kind not in best or r["moe_us"] < best[kind]["moe_us"]:
                best[kind] = r
    res = best["resident"]["moe_us"]
    # the whole-MoE-block counts include the model's own ops (router, routing, the combine); the offloaded
    # provider's ops are counted in the same block
    ops = {}
    for k in (2, 8):
        m2, s2 = (model, store) if k == 8 else build(2)
        ops[str(k)] = measure(m2, s2, "lru", 20, count=True)["ops"]
    gate_counts = measure(model, store, "gate", 20, count=True)
    out = {
        "resident_us": res,
        "offloaded_us": {k: best[k]["moe_us"] for k in kinds[1:]},
        "provider_us": {k: best[k]["provider_us"] for k in kinds[1:]},
        "provider_share": best["lru"]["provider_us"] / res,
        "host_time_ratio": best["lru"]["moe_us"] / res,
        "ops_per_layer": ops,
        "d2h_per_layer": gate_counts["reads"],
    }
    print(f"# host time per MoE layer, CPU, 1 thread; 128 experts, top-8, hidden 64, 4 MoE layers, "
          f"{args.steps} decode steps x {args.rounds} rounds (best)")
    print(f"resident                       {res:8.1f} us")
    for k in kinds[1:]:
        label = {"lru": "offloaded 100% warm, lru", "lfu": "offloaded 100% warm, lfu",
                 "gate": "offloaded 100% warm, gate d=3"}[k]
        print(f"{label:<31}{best[k]['moe_us']:8.1f} us  ({best[k]['moe_us'] / res:.2f}x resident; "
              f"provider {best[k]['provider_us']:.1f} us = {best[k]['provider_us'] / res:.2f} of resident)")
    print(f"provider_share {out['provider_share']:.3f} (target <= 0.10); host_time_ratio "
          f"{out['host_time_ratio']:.3f} (target <= 1.15)")
    print(f"tensor ops per MoE layer: top-2 {ops['2']:.1f}, top-8 {ops['8']:.1f} "
          f"({(ops['8'] - ops['2']) / 6:.1f} per routed expert, computed in place)")
    print(f"host reads per MoE layer with gate at lookahead 3: {out['d2h_per_layer']:.2f} (target 1)")
    out["cuda"] = cuda_decode(args.cuda_layers, args.cuda_tokens, args.rounds) if torch.cuda.is_available() else None
    if out["cuda"] is None:
        print("# CUDA decode (resident vs offloaded at 100%, with and without CUDA graphs): not run, no CUDA device")
    else:
        c = out["cuda"]
        print(f"# CUDA decode, Qwen3-30B-A3B shapes, {args.cuda_layers} layers, bf16, {args.cuda_tokens} tokens:")
        for k, v in c["tokens_per_s"].items():
            print(f"{k:<31}{v:8.1f} tok/s  ({v / c['tokens_per_s']['resident']:.3f}x resident)")
        print(f"offloaded 100% / resident: {c['offloaded_to_resident']:.3f} (target >= 0.97); with graphs "
              f"{c['offloaded_to_resident_graphs']:.3f}")
    if args.json:
        print(json.dumps(out))
    return 0


def cuda_decode(layers: int, new_tokens: int, rounds: int) -> dict:
    """Decode tokens/s on the GPU at real shapes: resident vs offloaded at 100% (warm), +/- CUDA graphs."""
    from moe_runtime.model.generate import generate

    spec = load_model_spec("qwen3-30b-a3b")
    cfg = dataclasses.replace(config_from_spec(spec, layers), vocab_size=8192)
    model, store = synthetic_model(cfg, "cuda", torch.bfloat16)
    resident = build_run(model, store, None, device="cuda").provider
    offloaded = build_run(model, store, OffloadOptions(budget="100%"), device="cuda").provider
    warm(offloaded, store, cfg.hidden_size)
    prompt = list(range(1, 9))
    best: dict[str, float] = {}
    for _ in range(rounds):  # interleaved; best round of each
        for name, prov, graphs in (("resident", resident, False), ("offloaded", offloaded, False),
                                   ("resident, graphs", resident, True), ("offloaded, graphs", offloaded, True)):
            r = generate(model, prov, prompt, new_tokens, cuda_graphs=graphs)
            best[name] = max(best.get(name, 0.0), r.tokens_per_s)
    offloaded.finish()
    return {"tokens_per_s": best, "offloaded_to_resident": best["offloaded"] / best["resident"],
            "offloaded_to_resident_graphs": best["offloaded, graphs"] / best["resident, graphs"],
            "graphs_speedup": best["offloaded, graphs"] / best["offloaded"]}


if __name__ == "__main__":
    sys.exit(main())
