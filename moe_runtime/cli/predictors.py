"""`moe-runtime calibrate` and `moe-runtime eval-predictors`: their flags and how they run.

The work is in ``predictors/calibrate.py`` (fitting aligned adapters),
``predictors/evaluate.py`` (recall/precision per distance) and
``predictors/text_data.py`` (tokens from text or random ids); this module only
parses flags and calls them. Outputs (``--out``, ``--plot``) are checked before
the model is loaded; numeric flags are finite and in range (``core/flags.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from moe_runtime.core.flags import SEED, integer, number
from moe_runtime.core.errors import MoeError
from moe_runtime.core.outputs import FORCE_HELP, check_output
from moe_runtime.model.checkpoint import load_model
from moe_runtime.predictors.calibrate import calibrate, load_adapters_for, save_adapters
from moe_runtime.predictors.evaluate import DEFAULT_PREDICTORS, evaluate, format_table, save_plot
from moe_runtime.predictors.text_data import DEFAULT_SEQ_LEN, load_tokens, token_chunks
from moe_runtime.core.options import OffloadOptions
from moe_runtime.model.experts import ResidentExperts
from moe_runtime.offload.session import build_run
from moe_runtime.traces import load_trace

MAX_INFLIGHT = 4  # copies in flight of an offloaded provider (no prefetching during calibration)


def make_provider(model, store, device: str | torch.device, slots: int | None = None):
    """Experts for ``device``: all resident when they fit (on the CPU no copy is made) and ``slots`` is None,
    else an offloading cache (assembled as every run is) of ``slots`` device slots (default: what fits in 80% of free memory),
    which must hold a whole layer's experts plus copies in flight, since a chunk may use every expert."""
    device = torch.device(device)
    if slots is None:
        if device.type != "cuda":
            return ResidentExperts(store, device)
        free, _ = torch.cuda.mem_get_info(device)
        if store.nbytes <= 0.8 * free:
            return ResidentExperts(store, device)
        slots = min(int(0.8 * free) // store.layout.nbytes, store.n_moe_layers * store.n_experts)
    need = store.n_experts + MAX_INFLIGHT
    if slots < need:
        raise MoeError(f"{slots} expert slots cannot hold one layer's {store.n_experts} experts plus {MAX_INFLIGHT} "
                       f"copies in flight (need {need}); free device memory or use --device cpu")
    return build_run(model, store, OffloadOptions(budget=str(slots), max_inflight=MAX_INFLIGHT),
                     device=device).provider


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """The data flags of calibrate and eval-predictors (see the module docstring)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="FILE.txt", help="UTF-8 text, tokenized with the checkpoint's tokenizer.json")
    src.add_argument("--random-tokens", type=integer(1), metavar="N",
                     help="N uniformly random token ids instead of text (checkpoints without a tokenizer)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of --random-tokens (default 0)")
    p.add_argument("--seq-len", type=integer(1), default=DEFAULT_SEQ_LEN,
                   help=f"tokens per forward; each chunk is an independent sequence (default {DEFAULT_SEQ_LEN})")
    p.add_argument("--max-tokens", type=integer(1), default=None, help="use at most this many tokens (default: all)")



def add_device_arguments(p: argparse.ArgumentParser) -> None:
    """--device and --expert-slots, shared with eval-predictors."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                   help="compute device (default cuda when available)")
    p.add_argument("--expert-slots", type=integer(1), default=None, metavar="N",
                   help="serve experts from N device slots (offloaded) instead of all resident "
                        "(default: resident when they fit in device memory, else as many slots as fit)")


def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    add_data_arguments(p)
    p.add_argument("--lookahead", type=integer(1), required=True, metavar="D", help="fit distances 1..D")
    p.add_argument("--rank", type=integer(1), required=True, metavar="R", help="adapter rank (U, V are [H, R])")
    p.add_argument("--ridge", type=number(0), default=1e-3,
                   help="ridge, relative to the mean diagonal of X^T X (default 1e-3)")
    p.add_argument("--refine-steps", type=integer(0), default=0, help="KL refinement Adam steps per pair (default 0)")
    p.add_argument("--refine-samples", type=integer(1), default=2048,
                   help="tokens kept (reservoir sample) for KL refinement (default 2048)")
    p.add_argument("--refine-lr", type=number(0, lo_open=True), default=1e-3, help="Adam learning rate of KL refinement (default 1e-3)")
    p.add_argument("--holdout", type=number(0, 1), default=0.25,
                   help="share of the chunks held out to validate each adapter; one that does not beat the "
                        "plain gate there is kept at zero (default 0.25; 0 keeps every fitted adapter)")
    add_device_arguments(p)
    p.add_argument("--out", required=True, metavar="FILE", help="adapter file to write (safetensors)")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)


def run_calibrate(args: argparse.Namespace) -> int:
    check_output(args.out, "--out", inputs=[args.model, args.data], kind="adapters", force=args.force)  # before the fit
    model, store = load_model(args.model, args.device)
    tokens = load_tokens(args.model, model.cfg.vocab_size, args.data, args.random_tokens, args.seed, args.max_tokens)
    chunks = token_chunks(tokens, args.seq_len)
    provider = make_provider(model, store, args.device, args.expert_slots)
    cal = calibrate(model, provider, chunks, args.lookahead, args.rank, args.ridge, args.refine_steps,
                    args.refine_samples, args.refine_lr, args.seed, progress=True, holdout=args.holdout)
    source = f"data:{Path(args.data).name}" if args.data else f"random:{args.random_tokens}:seed{args.seed}"
    save_adapters(cal, model, args.out, {"source": source, "ridge": args.ridge, "seq_len": args.seq_len,
                                          "refine_steps": args.refine_steps,
                                          "refine_lr": args.refine_lr, "holdout": args.holdout})
    ev = np.mean(list(cal.explained.values()))
    print(f"wrote {len(cal.adapters.pairs())} adapters (lookahead {args.lookahead}, rank {args.rank}) to {args.out}; "
          f"{cal.tokens} tokens, mean explained variance {ev:.3f}")
    if cal.heldout_tokens:
        fell = ", ".join(f"({l},{d})" for l, d in cal.fallback) or "none"
        print(f"validated on {cal.heldout_tokens} held-out tokens; kept the plain gate (zero adapter) for: {fell}")
    return 0


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--adapters", metavar="FILE", help="aligned adapters from `moe-runtime calibrate`")
    add_data_arguments(p)
    p.add_argument("--lookahead", type=integer(1), required=True, metavar="D", help="evaluate distances 1..D")
    p.add_argument("--predictors", default=None,
                   help=f"comma-separated registry names (default {','.join(DEFAULT_PREDICTORS)}; "
                        "aligned only with --adapters)")
    p.add_argument("--history-trace", metavar="FILE", help="trace whose routing primes history/popularity")
    add_device_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--plot", metavar="FILE.png", help="write recall vs distance per predictor")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)


def run_eval(args: argparse.Namespace) -> int:
    if args.predictors is None:
        names = [n for n in DEFAULT_PREDICTORS if n != "aligned" or args.adapters]
    else:
        names = [n.strip() for n in args.predictors.split(",") if n.strip()]
        if not names or len(set(names)) != len(names):
            raise MoeError(f"--predictors must be distinct comma-separated names, got {args.predictors!r}")
    if args.plot:
        check_output(args.plot, "--plot", inputs=[args.model, args.adapters, args.data, args.history_trace],
                     kind="plot", force=args.force)
    model, store = load_model(args.model, args.device)
    adapters = load_adapters_for(model, args.adapters, args.lookahead) if args.adapters else None
    trace = load_trace(args.history_trace) if args.history_trace else None
    tokens = load_tokens(args.model, model.cfg.vocab_size, args.data, args.random_tokens, args.seed, args.max_tokens)
    provider = make_provider(model, store, args.device, args.expert_slots)
    res = evaluate(model, provider, token_chunks(tokens, args.seq_len), names, args.lookahead, adapters, trace,
                   args.seed, progress=True)
    if args.plot:
        save_plot(res, args.plot)
    print(json.dumps(res.to_json()) if args.json else format_table(res))
    return 0
