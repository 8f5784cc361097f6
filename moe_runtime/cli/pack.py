"""`moe-runtime pack`: write a checkpoint's experts into one packed file for the disk tier.

The file (``offload/packed.py``) has every (MoE layer, expert) record 4 KiB
aligned for direct I/O and a header that ties it to the model; it is written
atomically, one MoE layer in memory at a time. Use it with
``moe-runtime generate --expert-source disk:FILE``.
"""

from __future__ import annotations

import argparse
import json

from moe_runtime.model.checkpoint import DTYPES, parse_dtype
from moe_runtime.core.format_sizes import EXPERT_DTYPES
from moe_runtime.core.outputs import FORCE_HELP, check_output
from moe_runtime.offload.tiers import pack_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--out", required=True, metavar="FILE", help="packed expert file to write")
    p.add_argument("--expert-dtype", default="auto", choices=list(EXPERT_DTYPES),
                   help="format of the packed experts (default: the checkpoint's; int8/int4 quantize them as "
                        "generate --expert-dtype does: run with the same --expert-dtype to read them)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="compute dtype the experts are packed for (default: the checkpoint's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)


def run(args: argparse.Namespace) -> int:
    check_output(args.out, "--out", inputs=[args.model], kind="packed experts", force=args.force)  # before the work
    info = pack_model(args.model, args.out, args.expert_dtype, parse_dtype(args.dtype))
    if args.json:
        print(json.dumps(info))
    else:
        print(f"wrote {info['experts']} experts of {info['record_bytes']:,} bytes ({info['dtype']}, "
              f"{info['bytes'] / 2**20:.1f} MiB) to {info['out']}")
    return 0
