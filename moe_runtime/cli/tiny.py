"""`moe-runtime make-tiny`: write a tiny random checkpoint of a family (``model/tiny.py`` builds it)."""

from __future__ import annotations

import argparse
from pathlib import Path

from moe_runtime.core.errors import MoeError
from moe_runtime.core.families import FAMILIES
from moe_runtime.model.checkpoint import DTYPES
from moe_runtime.model.tiny import TINY_EXPERT_DTYPES, write_tiny_checkpoint


MAKE_TINY_LAYERS = 4  # deepseek/glm keep their first layer dense: 4 layers give 3 MoE layers (lookahead 2 < 3)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from moe_runtime.core.flags import SEED, integer

    p.add_argument("--family", required=True, choices=list(FAMILIES), help="model family (config.json model_type)")
    p.add_argument("--out", required=True, help="directory to write the checkpoint to")
    p.add_argument("--seed", type=SEED, default=0, help="random seed (default 0)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weight dtype (default float32)")
    p.add_argument("--expert-dtype", default="auto", choices=list(TINY_EXPERT_DTYPES),
                   help="experts as --dtype (auto) or, for gpt_oss, MXFP4 blocks and scales as released")
    p.add_argument("--layers", type=integer(1, 64), default=MAKE_TINY_LAYERS,
                   help=f"decoder layers (default {MAKE_TINY_LAYERS}: at least 3 MoE layers in every family, so the "
                        "prefetch examples run at --lookahead 2)")
    p.add_argument("--force", action="store_true", help="replace what --out already holds")


def run(args: argparse.Namespace) -> int:
    from moe_runtime.core.outputs import check_output_dir

    if Path(args.out).is_dir() and any(Path(args.out).iterdir()) and not args.force:  # a checkpoint is precious
        raise MoeError(f"--out {args.out} is not empty (a checkpoint?); give --force to replace it")
    check_output_dir(args.out, "--out", checkpoint=True)  # creates it; refuses a file or an unwritable place in one line
    out = write_tiny_checkpoint(args.family, args.out, args.seed, args.dtype, expert_dtype=args.expert_dtype,
                                num_hidden_layers=args.layers)
    print(f"wrote a tiny random {args.family} checkpoint ({args.layers} layers) to {out}")
    return 0
