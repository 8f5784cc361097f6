"""Hybrid execution against copy-only in the real executor, on a real GPU (runs on CPU too, as a smoke test).

A model with real shapes (DeepSeek-V2-Lite by default, its first --layers MoE layers) and synthetic weights
decodes with routing forced from the bundled DeepSeek-V2-Lite trace, so every configuration computes the
same experts (benchmarks/decode.py's set-up). At each budget it runs:

- copy-only (``--miss-policy copy``), the executor before hybrid execution;
- host-only misses (``--miss-policy host``);
- ``auto`` (the cost rule, with fills), with the cost rule's figures measured at start-up or taken from
  ``--host-profile``;
- ``auto`` with the first half of the MoE layers on the host (``--n-host-layers``);

each ``--repeats`` times in interleaved rounds, the best round counting (shared machines are noisy). It
prints decode tokens/s, the ratio to copy-only at the same budget, hits, misses, experts computed on the
host, fills, bytes copied and stall, and whether the tokens equal the all-resident run's (on a GPU the
host's float sums differ from the device's in the last bits, so a token may flip; on CPU they must match).

    python3 benchmarks/hybrid_gpu.py --device cuda --layers 26 --new-tokens 64 --budgets 10,15,25
    python3 benchmarks/hybrid_gpu.py                          # CPU smoke: 3 layers, 8 tokens
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from decode import first_layers, tokens  # noqa: E402  (benchmarks/decode.py: the same set-up)
from moe_runtime.core.budget import layer_demand, minimum_slots  # noqa: E402
from moe_runtime.core.options import OffloadOptions  # noqa: E402
from moe_runtime.core.shapes import load_model_spec  # noqa: E402
from moe_runtime.model.checkpoint import DTYPES  # noqa: E402
from moe_runtime.model.generate import generate  # noqa: E402
from moe_runtime.model.synthetic import config_from_spec, synthetic_model  # noqa: E402
from moe_runtime.offload.forced_routing import ForcedRouting  # noqa: E402
from moe_runtime.offload.session import ExecutorOptions, build_run  # noqa: E402
from moe_runtime.traces import load_trace  # noqa: E402

FIELDS = ("hits", "misses", "host_computed", "fills", "bytes_h2d", "stall_s")


def decode(model, store, forced, device, prompt, new, n_slots, xopts, pool):
    """(result, report, the cost rule's source line) of one decode from an empty cache."""
    opts = None if n_slots is None else OffloadOptions(budget=str(n_slots), eviction="lru", max_inflight=4)
    run = build_run(model, store, opts, xopts, device=device, prompt_lens=[len(prompt)], max_new_tokens=new,
                    forced=forced, pool=pool)
    res = generate(run.model, run.provider, prompt, new)
    return res, run.finish(), run.miss_costs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-config", default="deepseek-v2-lite")
    p.add_argument("--trace", default=str(ROOT / "traces" / "deepseek-v2-lite-summary.npz"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--layers", type=int, default=3, help="MoE layers kept (default 3)")
    p.add_argument("--prompt-len", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--vocab", type=int, default=None, help="vocabulary (default 8192 on cpu, the spec's on cuda)")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--budgets", default="10,25", help="percent budgets (default 10,25)")
    p.add_argument("--host-profile", default=None, help="host profile for the cost rule (default: measured)")
    p.add_argument("--host-threads", type=int, default=None, help="threads for host compute")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best counts")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))  # a core for the copy thread
    spec = load_model_spec(args.model_config)
    cfg = dataclasses.replace(config_from_spec(spec, args.layers),
                              vocab_size=args.vocab or (8192 if device.type == "cpu" else spec.vocab_size))
    model, store = synthetic_model(cfg, device, DTYPES[args.dtype])
    L, E, K = store.n_moe_layers, store.n_experts, store.top_k
    trace = first_layers(load_trace(args.trace), L)
    forced = ForcedRouting(trace, n_moe_layers=L, n_experts=E, top_k=K)
    prompt = list(range(1, args.prompt_len + 1))
    forced.check_length(len(prompt) + args.new_tokens - 1)
    need = minimum_slots(experts_per_layer=layer_demand(top_k=K, batch=1, n_experts=E), max_inflight=4,
                         prefetching=False, scope="global", n_moe_layers=L)
    budgets = [int(b) for b in args.budgets.split(",")]
    pool = torch.empty(max(L * E * max(budgets) // 100, need), store.layout.numel, dtype=store.layout.dtype,
                       device=device)
    pool.zero_()  # touch every page once, outside the timed runs
    hyb = dict(host_profile=args.host_profile, host_threads=args.host_threads)
    policies = [("copy-only", ExecutorOptions(miss_policy="copy")),
                ("host misses", ExecutorOptions(miss_policy="host", **hyb)),
                ("auto", ExecutorOptions(miss_policy="auto", **hyb)),
                (f"auto, {L // 2} host layers", ExecutorOptions(miss_policy="auto", n_host_layers=L // 2, **hyb))]
    configs = [("all-resident", None, ExecutorOptions())] + [
        (f"{b}% {name}", max(L * E * b // 100, need), x) for b in budgets for name, x in policies]
    print(f"# {spec.name}: {L} MoE layers, {E} experts, top-{K}, expert {store.layout.nbytes / 1e6:.1f} MB "
          f"{args.dtype}; device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f"; prompt {len(prompt)}, {args.new_tokens} new tokens; forced routing from {Path(args.trace).name}")
    decode(model, store, forced, device, prompt, 2, need, ExecutorOptions(miss_policy="copy"), pool)  # warm-up
    best: dict[str, tuple] = {}
    for _ in range(args.repeats):
        for name, n_slots, x in configs:
            t0 = time.perf_counter()
            res, rep, costs = decode(model, store, forced, device, prompt, args.new_tokens, n_slots, x, pool)
            if name not in best or res.tokens_per_s > best[name][0].tokens_per_s:
                best[name] = (res, rep, costs, time.perf_counter() - t0)
    ref = tokens(best["all-resident"][0])
    for name, _, _ in configs:
        if best[name][2]:
            print(f"# {name}: {best[name][2]}")
            break
    print(f"{'config':<28}{'tok/s':>8}{'x copy':>8}{'hits':>6}{'miss':>6}{'host':>6}{'fills':>6}{'MB copied':>10}"
          f"{'stall s':>9}  tokens")
    for name, n_slots, x in configs:
        res, rep, _, _ = best[name]
        copy = best.get(f"{name.split('%')[0]}% copy-only") if n_slots else None
        ratio = res.tokens_per_s / copy[0].tokens_per_s if copy else float("nan")
        line = f"{name:<28}{res.tokens_per_s:>8.2f}{ratio:>8.2f}"
        if rep:
            line += (f"{rep['hits']:>6}{rep['misses']:>6}{rep['host_computed']:>6}{rep['fills']:>6}"
                     f"{rep['bytes_h2d'] / 1e6:>10.1f}{rep['stall_s']:>9.3f}")
        else:
            line += " " * 43
        print(line + ("  = resident" if tokens(res) == ref else "  differ from resident"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
