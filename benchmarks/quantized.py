"""Quantized experts: what int8 and int4 cost in quality and save in bytes (targets: int8 perplexity within 1%
of bf16, int4 within 5%; int4 bytes per expert at most 0.3x bf16 at hidden 2048).

    python3 benchmarks/train_tiny_moe.py --out out/tiny-moe      # once (~6-20 min on 2 cores)
    python3 benchmarks/quantized.py [--model out/tiny-moe] [--tokens 8192] [--window 256] [--json]

1. loads the trained tiny Mixtral-family MoE with its experts kept as float32 (as trained), bfloat16,
   int8 and int4 (``load_model(expert_dtype=...)``; the dense weights and the compute stay float32, so
   only the experts' format differs between rows);
2. runs the held-out text (``heldout.txt``, never trained on) in windows of ``--window`` tokens through
   each, all experts resident: perplexity of the next token, and greedy top-1 agreement, the fraction of
   positions whose argmax next token equals the bf16 model's;
3. prints bytes per expert as a ratio to bf16, for the tiny model and, from the same size table the
   runtime uses, for real models' shapes (configs/models).

``--json`` prints the rows and the real-shape ratios as one object. CPU only; about 5 minutes on 2 busy cores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_runtime.model.checkpoint import load_model  # noqa: E402
from moe_runtime.model.experts import ResidentExperts  # noqa: E402
from moe_runtime.core.shapes import load_model_spec  # noqa: E402
from moe_runtime.predictors.text_data import load_tokens  # noqa: E402

FORMATS = ("float32", "bfloat16", "int8", "int4")
REAL = ("qwen3-30b-a3b", "deepseek-v2-lite", "olmoe-1b-7b", "mixtral-8x7b", "gpt-oss-20b")


@torch.inference_mode()
def evaluate(model_dir: Path, expert_dtype: str, tokens: torch.Tensor, window: int):
    """(perplexity, argmax next tokens [N], bytes per expert, seconds) with experts in ``expert_dtype``."""
    model, store = load_model(model_dir, "cpu", torch.float32, expert_dtype=expert_dtype)
    provider = ResidentExperts(store, "cpu")
    nll, count, tops = 0.0, 0, []
    t0 = time.perf_counter()
    for a in range(0, len(tokens) - 1, window):
        chunk = tokens[a: a + window + 1]
        if len(chunk) < 2:
            break
        x, y = chunk[:-1], chunk[1:]
        model.setup_cache(len(x))
        logits = model(x, torch.arange(len(x)), provider)  # [T, V]
        nll += F.cross_entropy(logits.float(), y, reduction="sum").item()
        count += len(y)
        tops.append(logits.argmax(-1))
    return math.exp(nll / count), torch.cat(tops), store.layout.nbytes, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="out/tiny-moe", help="trained checkpoint (benchmarks/train_tiny_moe.py)")
    p.add_argument("--tokens", type=int, default=8192, help="held-out tokens to evaluate (default 8192)")
    p.add_argument("--window", type=int, default=256, help="tokens per forward pass (default 256)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    model_dir = Path(args.model)
    if not (model_dir / "heldout.txt").is_file():
        sys.exit(f"{model_dir}/heldout.txt not found: run benchmarks/train_tiny_moe.py --out {model_dir} first")
    cfg = json.loads((model_dir / "config.json").read_text())
    ids = torch.from_numpy(load_tokens(model_dir, cfg["vocab_size"], model_dir / "heldout.txt",
                                       max_tokens=args.tokens + 1))
    results = {f: evaluate(model_dir, f, ids, args.window) for f in FORMATS}
    ref_ppl, ref_top, ref_bytes = results["bfloat16"][:3]
    rows = [dict(expert_dtype=f, perplexity=ppl, ppl_vs_bf16=ppl / ref_ppl - 1,
                 top1_agreement_vs_bf16=(top == ref_top).float().mean().item(), bytes_per_expert=nb,
                 bytes_vs_bf16=nb / ref_bytes, seconds=s) for f, (ppl, top, nb, s) in results.items()]
    real = {}
    for name in REAL:
        spec = load_model_spec(name)
        bf16 = spec.with_expert_dtype("bfloat16").expert_bytes
        real[name] = dict(hidden=spec.hidden_size, intermediate=spec.moe_intermediate_size, bf16_bytes=bf16,
                          **{f"{d}_vs_bf16": spec.with_expert_dtype(d).expert_bytes / bf16
                             for d in ("int8", "int4", "mxfp4") if d != "mxfp4" or spec.hidden_size % 32 == 0})
    if args.json:
        print(json.dumps(dict(model=str(model_dir), tokens=len(ids) - 1, window=args.window, rows=rows,
                              real_shapes=real), indent=2))
        return 0
    print(f"{model_dir}: hidden {cfg['hidden_size']}, expert intermediate {cfg['intermediate_size']}, "
          f"{cfg['num_local_experts']} experts top-{cfg['num_experts_per_tok']}; {len(ids) - 1} held-out tokens "
          f"in windows of {args.window}; dense weights and compute float32")
    print(f"{'experts':>9} {'perplexity':>11} {'vs bf16':>8} {'top-1 agree':>12} {'bytes/expert':>13} "
          f"{'vs bf16':>8} {'time s':>7}")
    for r in rows:
        print(f"{r['expert_dtype']:>9} {r['perplexity']:11.4f} {100 * r['ppl_vs_bf16']:+7.2f}% "
              f"{100 * r['top1_agreement_vs_bf16']:11.2f}% {r['bytes_per_expert']:13,} {r['bytes_vs_bf16']:8.3f} "
              f"{r['seconds']:7.1f}")
    print("\nbytes per expert vs bf16 at real shapes (configs/models):")
    for name, r in real.items():
        extra = f"  mxfp4 {r['mxfp4_vs_bf16']:.3f}" if "mxfp4_vs_bf16" in r else ""
        print(f"  {name:>17} H={r['hidden']:<5} I={r['intermediate']:<5} bf16 {r['bf16_bytes']:>11,} B  "
              f"int8 {r['int8_vs_bf16']:.3f}  int4 {r['int4_vs_bf16']:.3f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
