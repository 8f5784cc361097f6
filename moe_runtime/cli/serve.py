"""`moe-runtime serve`: an OpenAI-compatible HTTP server over a checkpoint (``moe_runtime/serve``).

Takes generate's offloading flags (``cli/offload.py``; the run is assembled by ``offload/session.load_run``
for a batch of ``--max-batch`` sequences) except those that need the future, the server's own
(``ServeOptions``), ``--force`` (as generate's: ``--timeline`` may replace another kind of file) and
``--config FILE``. The port is bound before any weight is loaded (a taken port is one error line, at
once); one line announces the address, the real port, once the socket listens. Needs the ``serve`` extra
(``pip install -e .[serve]``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from moe_runtime.cli.config_file import add_config_argument
from moe_runtime.cli.offload import add_arguments as add_offload_arguments, run_options
from moe_runtime.core.errors import MoeError
from moe_runtime.core.flags import add_option_flags
from moe_runtime.core.format_sizes import EXPERT_DTYPES
from moe_runtime.core.outputs import FORCE_HELP
from moe_runtime.model.checkpoint import DTYPES, check_model_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    from moe_runtime.serve.server import ServeOptions

    p.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                   help="compute device (default cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="compute dtype (default: checkpoint's)")
    p.add_argument("--expert-dtype", default="auto", choices=list(EXPERT_DTYPES),
                   help="how experts are kept, copied and cached (as generate's --expert-dtype)")
    p.add_argument("--trust-weights", action="store_true", help="skip the check that every weight is finite")
    p.add_argument("--force", action="store_true", help=FORCE_HELP + " (--timeline)")
    add_config_argument(p)
    add_option_flags(p.add_argument_group("server"), ServeOptions)
    add_offload_arguments(p)


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
        import prometheus_client  # noqa: F401
        import jinja2  # noqa: F401
    except ImportError as e:
        raise MoeError(f"serve needs the server extra ({e.name} is missing): pip install -e '.[serve]'") from None
    from moe_runtime.core.flags import options_from_args
    from moe_runtime.core.model_config import load_config
    from moe_runtime.model.checkpoint import checkpoint_dtype
    from moe_runtime.model.device import use_cpu_threads
    from moe_runtime.model.generate import load_tokenizer
    from moe_runtime.offload.session import load_run
    from moe_runtime.serve.server import Server, ServeOptions, bind, check_servable
    from moe_runtime.serve.text import ChatTemplate

    check_model_dir(args.model)
    sopts = options_from_args(ServeOptions, args)
    opts, xopts = run_options(args, check_finite=not args.trust_weights, force=args.force)
    check_servable(opts, xopts)
    cfg = load_config(args.model)
    max_len = sopts.max_context or cfg.max_position_embeddings
    if max_len > cfg.max_position_embeddings:
        raise MoeError(f"--max-context {max_len} exceeds the model's max_position_embeddings "
                       f"({cfg.max_position_embeddings})")
    batch = fit_batch(cfg, checkpoint_dtype(args.model, args.dtype), max_len, sopts.max_batch, args.device)
    if batch < sopts.max_batch:
        print(f"serve: the KV cache of {sopts.max_batch} x {max_len} positions does not fit; --max-batch {batch}",
              file=sys.stderr)
        from dataclasses import replace
        sopts = replace(sopts, max_batch=batch)
    tokenizer = load_tokenizer(args.model)
    template = ChatTemplate.load(args.model)
    use_cpu_threads(args.device)
    sock = bind(sopts.host, sopts.port)  # a taken port fails now, not after the weights have loaded
    try:
        # the budget is checked for a batch of --max-batch sequences before any weight is loaded
        run = load_run(args.model, opts, xopts, device=args.device, dtype=args.dtype,
                       expert_dtype=args.expert_dtype, prompt_lens=[1] * sopts.max_batch, max_new_tokens=1)
    except BaseException:
        sock.close()
        raise
    if run.miss_costs:  # hybrid: where the cost rule's figures came from, as generate prints it
        print(f"[{run.miss_costs}]", file=sys.stderr)
    server = Server(args.model, run, sopts, tokenizer=tokenizer, template=template, max_len=max_len, sock=sock)
    address = server.listen()
    print(f"serve: {Path(args.model).name} on {address} ({'offloaded' if opts else 'resident'}, "
          f"batch {sopts.max_batch}, context {max_len}{'' if template else ', no chat template'})", file=sys.stderr,
          flush=True)
    server.serve()
    return 0


def fit_batch(cfg, dtype, max_len: int, max_batch: int, device) -> int:
    """The largest batch up to ``max_batch`` whose KV cache and tables fit (MoeError if not even one)."""
    from moe_runtime.cli.generate import check_decode_length  # cli may import cli; serve never imports cli

    n = max_batch
    while True:
        try:
            check_decode_length(cfg, dtype, max_len - 1, 1, device, n)
            return n
        except MoeError:
            if n == 1:
                raise
            n //= 2
