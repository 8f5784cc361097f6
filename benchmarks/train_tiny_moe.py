"""Train a tiny Mixtral-family MoE on Python standard-library source, deterministically.

Benchmark/test helper, not runtime code: it uses ``transformers``'
``MixtralForCausalLM`` (with its load-balancing loss) and the ``tokenizers``
library, neither of which ``moe_runtime`` may import.

Text: the top-level ``*.py`` files of the standard library (the directory of
the ``os`` module), sorted by name and split by position into three disjoint
sets: every 10th file (index % 10 == 0) is held out, index % 10 == 5 is the
calibration split, the rest is training text. Files are joined with the
``<|endoftext|>`` token.

Writes to ``--out`` (atomically where it matters):
  config.json, model.safetensors   ``MixtralForCausalLM.save_pretrained``
  tokenizer.json                   byte-level BPE trained on the training split
  calib.txt, heldout.txt           the calibration and held-out texts
  train_report.json                held-out loss/perplexity before and after
                                   training, per-layer routing entropies (of the
                                   mean routing distribution, and mean per-token)
                                   against the uniform maximum ln(n_experts),
                                   the loss curve, wall time, file lists.

Same seed, same steps, same Python version -> same checkpoint (deterministic
algorithms, 2 threads, a seeded numpy generator picks the training windows),
unless ``--time-limit`` cuts training short on a busy machine: the report then
shows steps_done < steps_requested. Saved weights use the original Mixtral
names (``block_sparse_moe.experts.E.w1/w2/w3``, ``block_sparse_moe.gate``).

    python benchmarks/train_tiny_moe.py --out out/tiny-moe           # ~9 min on 2 idle cores
    python benchmarks/train_tiny_moe.py --out out/tiny-smoke --quick  # ~1 min
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

from moe_runtime.core.errors import run_cli
from moe_runtime.core.outputs import check_output_dir, write_text_atomic

EOT = "<|endoftext|>"


def stdlib_splits() -> tuple[list[str], list[str], list[str]]:
    """Return (train, calib, heldout) lists of absolute paths of stdlib ``*.py`` files."""
    root = os.path.dirname(os.__file__)
    files = sorted(f for f in os.listdir(root) if f.endswith(".py"))
    train, calib, held = [], [], []
    for i, f in enumerate(files):
        p = os.path.join(root, f)
        (held if i % 10 == 0 else calib if i % 10 == 5 else train).append(p)
    return train, calib, held


def read_joined(paths: list[str], max_chars: int | None = None) -> str:
    """Concatenate files (utf-8, undecodable bytes replaced) separated by EOT, capped at max_chars."""
    parts, n = [], 0
    for p in paths:
        with open(p, encoding="utf-8", errors="replace") as f:
            t = f.read()
        parts.append(t)
        n += len(t)
        if max_chars is not None and n >= max_chars:
            break
    text = EOT.join(parts)
    return text[:max_chars] if max_chars is not None else text


def train_tokenizer(text: str, vocab_size: int):
    """Byte-level BPE over ``text``; EOT is special token id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    chunks = text.split(EOT)
    tok.train_from_iterator(chunks, trainer=trainer)
    return tok


def encode(tok, text: str) -> np.ndarray:
    """Token ids of ``text`` with EOT (id 0) between the files, as int64."""
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for chunk in text.split(EOT):
        ids.extend(tok.encode(chunk).ids)
        ids.append(eot)
    return np.asarray(ids, dtype=np.int64)


@torch.no_grad()
def evaluate(model, ids: np.ndarray, seq: int, n_windows: int, n_experts: int) -> dict:
    """Held-out loss over fixed, evenly spaced windows, and per-layer routing entropies (nats)."""
    model.eval()
    starts = np.linspace(0, len(ids) - seq - 1, n_windows).astype(np.int64)
    tot_loss, tot_tok = 0.0, 0
    L = model.config.num_hidden_layers
    prob_sum = torch.zeros(L, n_experts, dtype=torch.float64)
    tok_ent = torch.zeros(L, dtype=torch.float64)
    topk_mass = torch.zeros(L, dtype=torch.float64)
    k = model.config.num_experts_per_tok
    n_route = 0
    for b in range(0, len(starts), 8):
        x = torch.from_numpy(np.stack([ids[s:s + seq + 1] for s in starts[b:b + 8]]))
        out = model(input_ids=x[:, :-1], output_router_logits=True)
        logits = out.logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        tot_loss += float(loss)
        tot_tok += x[:, 1:].numel()
        for l, rl in enumerate(out.router_logits):
            p = torch.softmax(rl.double(), dim=-1)  # [tokens, E]
            prob_sum[l] += p.sum(0)
            tok_ent[l] += -(p * torch.log(p.clamp_min(1e-30))).sum()
            topk_mass[l] += p.topk(k, dim=-1).values.sum()
        n_route += out.router_logits[0].shape[0]
    mean_p = prob_sum / n_route
    ent_mean = -(mean_p * torch.log(mean_p.clamp_min(1e-30))).sum(-1)
    model.train()
    loss = tot_loss / tot_tok
    return {
        "loss": loss, "ppl": math.exp(loss), "tokens": tot_tok,
        "uniform_entropy": math.log(n_experts),
        "entropy_of_mean_routing": [float(v) for v in ent_mean],
        "mean_token_entropy": [float(v) for v in tok_ent / n_route],
        "uniform_topk_mass": k / n_experts,
        "mean_topk_mass": [float(v) for v in topk_mass / n_route],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/tiny-moe")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default 320, quick 120)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="~1 minute smoke run on a smaller model")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="dtype of the saved weights (training is fp32)")
    ap.add_argument("--time-limit", type=float, default=19 * 60,
                    help="stop training early after this many seconds (recorded in the report)")
    args = ap.parse_args()
    steps = args.steps if args.steps is not None else (120 if args.quick else 320)

    t0 = time.time()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(args.seed)
    check_output_dir(args.out, "--out", checkpoint=True)  # before minutes of training: created, or one line why not

    from transformers import MixtralConfig, MixtralForCausalLM

    train_f, calib_f, held_f = stdlib_splits()
    cap = 400_000 if args.quick else None
    train_text = read_joined(train_f, cap)
    calib_text = read_joined(calib_f, 300_000)
    held_text = read_joined(held_f, 300_000)
    write_text_atomic(os.path.join(args.out, "calib.txt"), calib_text)
    write_text_atomic(os.path.join(args.out, "heldout.txt"), held_text)

    vocab = 4096
    tok = train_tokenizer(train_text, vocab)
    write_text_atomic(os.path.join(args.out, "tokenizer.json"), tok.to_str(pretty=True))
    train_ids, held_ids = encode(tok, train_text), encode(tok, held_text)
    print(f"text: train {len(train_f)} files {len(train_ids)} tokens, calib {len(calib_f)} files, "
          f"heldout {len(held_f)} files {len(held_ids)} tokens; tokenizer {time.time() - t0:.1f}s")

    shape = dict(num_hidden_layers=4, hidden_size=128, intermediate_size=256) if args.quick else \
        dict(num_hidden_layers=8, hidden_size=256, intermediate_size=512)
    cfg = MixtralConfig(
        vocab_size=tok.get_vocab_size(), num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=16, num_experts_per_tok=2, max_position_embeddings=1024,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        router_aux_loss_coef=args.aux_coef, output_router_logits=True, router_jitter_noise=0.0,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, use_cache=True, **shape)
    model = MixtralForCausalLM(cfg)
    model.train()
    n_exp = cfg.num_local_experts
    n_win = 16 if args.quick else 48
    before = evaluate(model, held_ids, args.seq, n_win, n_exp)
    print(f"init: heldout loss {before['loss']:.3f}")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    curve, t_train, done = [], time.time(), 0
    for step in range(steps):
        starts = rng.integers(0, len(train_ids) - args.seq - 1, size=args.batch)
        x = torch.from_numpy(np.stack([train_ids[s:s + args.seq + 1] for s in starts]))
        out = model(input_ids=x[:, :-1], labels=x[:, :-1].clone(), output_router_logits=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        done = step + 1
        if step % 10 == 0 or done == steps:
            el = time.time() - t_train
            curve.append({"step": done, "loss": out.loss.item(), "aux": out.aux_loss.item(), "s": el})
            print(f"step {done:4d}/{steps} loss {out.loss.item():.3f} aux {out.aux_loss.item():.3f} "
                  f"{el / done:.2f}s/step", flush=True)
        if time.time() - t0 > args.time_limit:
            print(f"time limit reached after {done} steps", flush=True)
            break
    train_s = time.time() - t_train

    after = evaluate(model, held_ids, args.seq, n_win, n_exp)
    model.to(getattr(torch, args.dtype)).save_pretrained(args.out)

    u = after["uniform_entropy"]
    print(f"\nheld-out loss {before['loss']:.3f} -> {after['loss']:.3f} "
          f"(ppl {before['ppl']:.0f} -> {after['ppl']:.1f}); uniform routing entropy ln({n_exp}) = {u:.3f}, "
          f"uniform top-{cfg.num_experts_per_tok} mass {after['uniform_topk_mass']:.3f}")
    print(f"{'layer':>5} {'H(mean) init':>13} {'H(mean)':>8} {'H(token) init':>14} {'H(token)':>9} {'H(token)/max':>12} {'top-k mass':>10}")
    for l in range(cfg.num_hidden_layers):
        print(f"{l:5d} {before['entropy_of_mean_routing'][l]:13.3f} {after['entropy_of_mean_routing'][l]:8.3f} "
              f"{before['mean_token_entropy'][l]:14.3f} {after['mean_token_entropy'][l]:9.3f} "
              f"{after['mean_token_entropy'][l] / u:12.2f} {after['mean_topk_mass'][l]:10.3f}")
    wall = time.time() - t0
    report = {
        "seed": args.seed, "steps_requested": steps, "steps_done": done, "quick": args.quick,
        "batch": args.batch, "seq": args.seq, "lr": args.lr, "aux_coef": args.aux_coef,
        "saved_dtype": args.dtype, "python": sys.version.split()[0], "torch": torch.__version__,
        "model": {k: getattr(cfg, k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                               "num_attention_heads", "num_key_value_heads",
                                               "num_local_experts", "num_experts_per_tok", "vocab_size")},
        "n_params": sum(p.numel() for p in model.parameters()),
        "text": {"train_files": len(train_f), "calib_files": [os.path.basename(p) for p in calib_f],
                 "heldout_files": [os.path.basename(p) for p in held_f],
                 "train_tokens": int(len(train_ids)), "heldout_tokens": int(len(held_ids))},
        "heldout_before": before, "heldout_after": after, "curve": curve,
        "train_seconds": train_s, "wall_seconds": wall,
    }
    write_text_atomic(os.path.join(args.out, "train_report.json"), json.dumps(report, indent=1))
    print(f"wall {wall:.0f}s (training {train_s:.0f}s, {done} steps); wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main, "train_tiny_moe.py")
