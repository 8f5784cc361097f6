"""`moe-runtime generate`: decode text with a local MoE checkpoint, every expert resident on the device.

Prints the generated text (or token ids without a tokenizer), or with
``--json`` one JSON object: sequences (one ``{token_ids, text}`` per prompt:
generated tokens only, text when the checkpoint has a tokenizer.json; with
one prompt both also at the top level), prefill_s, decode_s, tokens_per_s
(every sequence's decoded tokens over the decode time). Repeated
``--prompt``/``--prompt-ids`` decode together as one static batch.
Before any weight is loaded, a decode longer than the model's
``max_position_embeddings`` or whose KV cache cannot fit in memory is refused;
the CPU thread rule (``model/device.use_cpu_threads``) is the same for the
resident and the offloading paths, so their speeds compare.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from moe_runtime.model.checkpoint import DTYPES, check_model_dir, checkpoint_dtype
from moe_runtime.core.format_sizes import EXPERT_DTYPES
from moe_runtime.core.model_config import ModelConfig, load_config
from moe_runtime.core.errors import MoeError
from moe_runtime.core.flags import SEED, integer, number
from moe_runtime.core.outputs import FORCE_HELP
from moe_runtime.model.device import check_fits, use_cpu_threads
from moe_runtime.model.generate import generate, load_tokenizer, parse_prompt_ids
from moe_runtime.cli.config_file import add_config_argument, describe_sources
from moe_runtime.cli.offload import add_arguments as add_offload_arguments, run_options, summary
from moe_runtime.offload.session import load_run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (needs tokenizer.json in the checkpoint); "
                     "repeat it to decode several prompts together as one batch")
    src.add_argument("--prompt-ids", action="append", help="prompt as comma-separated token ids, e.g. 1,2,3; "
                     "repeatable, as --prompt")
    p.add_argument("--max-new-tokens", type=integer(1), default=32, help="tokens to generate (default 32)")
    p.add_argument("--temperature", type=number(0), default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=number(0, 1, lo_open=True), default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=SEED, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                   help="compute device (default cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="compute dtype (default: checkpoint's)")
    p.add_argument("--expert-dtype", default="auto", choices=list(EXPERT_DTYPES),
                   help="how experts are kept in host memory, copied and cached: auto keeps the checkpoint's "
                        "(MXFP4 stays MXFP4, float experts take --dtype); int8/int4 quantize them group-wise at "
                        "load (groups of 32, float16 scales) and dequantize on the device")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay decode steps as CUDA graphs, one per stretch between MoE layers' expert fetches "
                        "(the host's cache bookkeeping runs between them); --device cuda only")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--force", action="store_true", help=FORCE_HELP + " (--record-trace, --timeline)")
    p.add_argument("--trust-weights", action="store_true",
                   help="skip the check that every weight is finite (NaN/inf refused, naming the tensor): one "
                        "pass over the weights at load, and over each expert read from disk the first time")
    add_offload_arguments(p)  # --expert-budget, --eviction, --predictor, ... (cli/offload.py)
    add_config_argument(p)  # --config plan.yaml (cli/config_file.py)


def check_decode_length(cfg: ModelConfig, dtype: torch.dtype, n_prompt: int, max_new_tokens: int, device,
                        batch: int = 1) -> None:
    """Refuse (MoeError) a decode past the model's positions, or whose KV cache (``batch`` sequences of the
    longest prompt) and mask cannot fit."""
    n = n_prompt + max_new_tokens  # what generate() preallocates
    if n > cfg.max_position_embeddings:
        raise MoeError(f"prompt ({n_prompt} tokens) + --max-new-tokens {max_new_tokens} = {n} positions exceeds "
                       f"the model's max_position_embeddings ({cfg.max_position_embeddings})")
    item = torch.empty((), dtype=dtype).element_size()
    kv = batch * cfg.n_layers * cfg.kv_elements_per_token() * n * item  # setup_cache: k and v (MLA: latent)
    tables = n * n + 2 * n * cfg.head_dim * (4 + item)  # the [n, n] bool causal mask; RoPE cos/sin
    check_fits(f"a KV cache for {n} positions (--max-new-tokens {max_new_tokens})", kv + tables, device)


def run(args: argparse.Namespace) -> int:
    check_model_dir(args.model)
    tokenizer = load_tokenizer(args.model)
    if args.prompt is not None:
        if tokenizer is None:
            raise MoeError(f"--prompt needs {args.model}/tokenizer.json; give --prompt-ids instead")
        prompts = [tokenizer.encode(p).ids for p in args.prompt]
        if not all(prompts):
            raise MoeError("--prompt encodes to no tokens: give some text")
    else:
        prompts = [parse_prompt_ids(p) for p in args.prompt_ids]
    check_decode_length(load_config(args.model), checkpoint_dtype(args.model, args.dtype),
                        max(map(len, prompts)), args.max_new_tokens, args.device, len(prompts))
    if args.cuda_graphs and torch.device(args.device).type != "cuda":
        raise MoeError("--cuda-graphs needs --device cuda (there are no CUDA graphs on the CPU)")
    if args.cuda_graphs and (args.route_from_trace or args.record_trace):
        raise MoeError("--cuda-graphs cannot force or record routing (--route-from-trace, --record-trace): "
                       "their per-step host values are not part of a graph")
    opts, xopts = run_options(args, check_finite=not args.trust_weights, force=args.force)
    use_cpu_threads(args.device)  # resident and offloaded alike
    # a budget below the minimum is refused before any weight is loaded
    run = load_run(args.model, opts, xopts, device=args.device, dtype=args.dtype, expert_dtype=args.expert_dtype,
                   prompt_lens=[len(p) for p in prompts], max_new_tokens=args.max_new_tokens)
    sources = describe_sources(args)
    if sources:  # once the settings passed their checks: which values the file set and which flags overrode it
        print(f"[{sources}]", file=sys.stderr)
    if run.miss_costs:  # hybrid: where the cost rule's figures came from (a profile, or measured just now)
        print(f"[{run.miss_costs}]", file=sys.stderr)
    try:
        res = generate(run.model, run.provider, prompts[0] if len(prompts) == 1 else prompts,
                       args.max_new_tokens, args.temperature, args.top_p, args.seed, run.model.cfg.eos_token_ids,
                       cuda_graphs=args.cuda_graphs)
    except BaseException:
        run.close()
        raise
    offload = run.finish()
    seqs = getattr(res, "sequences", [res])
    sequences = [{"token_ids": s.token_ids} for s in seqs]
    if tokenizer is not None:
        for row, s in zip(sequences, seqs):
            row["text"] = tokenizer.decode(s.token_ids)
    if args.json:
        out = dict(sequences[0]) if len(seqs) == 1 else {}  # one prompt: also at the top level, as before
        out.update(sequences=sequences, prefill_s=res.prefill_s, decode_s=res.decode_s,
                   tokens_per_s=res.tokens_per_s)
        out.update(offload or {})
        print(json.dumps(out))
    else:
        for i, row in enumerate(sequences):
            if len(sequences) > 1:
                print(f"--- sequence {i}")
            print(row.get("text", ",".join(map(str, row["token_ids"]))))
        n = sum(len(s.token_ids) for s in seqs)
        print(f"[{n} tokens{f' in {len(seqs)} sequences' if len(seqs) > 1 else ''}; prefill {res.prefill_s:.3f} s; "
              f"decode {res.tokens_per_s:.1f} tokens/s]", file=sys.stderr)
        if offload:
            print(f"[{summary(offload)}]", file=sys.stderr)
    return 0
