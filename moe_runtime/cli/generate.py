"""`moe-runtime generate`: decode text with a local MoE checkpoint, every expert resident on the device.

Prints the generated text (or token ids without a tokenizer), or with
``--json`` one JSON object: token_ids (generated only), text (when the
checkpoint has a tokenizer.json), prefill_s, decode_s, tokens_per_s.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from moe_runtime.model.checkpoint import DTYPES, load_model, parse_dtype
from moe_runtime.errors import MoeError
from moe_runtime.model.experts import ResidentExperts
from moe_runtime.model.generate import generate, load_tokenizer, parse_prompt_ids
from moe_runtime.cli.offload import OffloadRun, add_arguments as add_offload_arguments, expert_source, preflight


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs tokenizer.json in the checkpoint)")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                   help="compute device (default cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="compute dtype (default: checkpoint's)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_offload_arguments(p)  # --budget, --policy, --predictor, ... (offload_cli.py)


def run(args: argparse.Namespace) -> int:
    tokenizer = load_tokenizer(args.model)
    if args.prompt is not None:
        if tokenizer is None:
            raise MoeError(f"--prompt needs {args.model}/tokenizer.json; give --prompt-ids instead")
        prompt_ids = tokenizer.encode(args.prompt).ids
    else:
        prompt_ids = parse_prompt_ids(args.prompt_ids)
    preflight(args)  # a budget below the minimum is refused before any weight is loaded
    on_disk = expert_source(args)[0] == "disk"  # experts stay on storage: the store holds none
    model, store = load_model(args.model, args.device, parse_dtype(args.dtype), load_experts=not on_disk)
    off = OffloadRun.build(args, model, store, len(prompt_ids))
    provider = off.provider if off else ResidentExperts(store, args.device)
    try:
        res = generate(off.model if off else model, provider, prompt_ids, args.max_new_tokens, args.temperature,
                       args.top_p, args.seed, model.cfg.eos_token_ids)
    except BaseException:
        if off is not None:  # stop the copy thread before exiting: one left running can abort the interpreter
            off.provider.engine.close()
        raise
    offload = off.finish() if off else None
    text = tokenizer.decode(res.token_ids) if tokenizer is not None else None
    if args.json:
        out = {"token_ids": res.token_ids}
        if text is not None:
            out["text"] = text
        out.update(prefill_s=res.prefill_s, decode_s=res.decode_s, tokens_per_s=res.tokens_per_s)
        out.update(offload or {})
        print(json.dumps(out))
    else:
        print(text if text is not None else ",".join(map(str, res.token_ids)))
        print(f"[{len(res.token_ids)} tokens; prefill {res.prefill_s:.3f} s; "
              f"decode {res.tokens_per_s:.1f} tokens/s]", file=sys.stderr)
    return 0
