"""`moe-runtime`: the executor's command line.

Each subcommand's flags and entry point live in a module of this package (or,
for ``profile`` and ``make-tiny``, beside the code they run) as
``add_...(parser)`` and ``run...(args) -> int``; this file only lists them, so
flags are defined in one place per command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from moe_runtime.cli.config import apply_config
from moe_runtime.core.errors import ArgumentParser, MoeError, _error, run_cli

# name -> (module, flags function, run function, one-line help)
COMMANDS = {
    "profile": ("moe_runtime.cli.profile", "add_arguments", "run",
                "measure copy bandwidth/latency and MoE layer compute; write a device YAML"),
    "generate": ("moe_runtime.cli.generate", "add_arguments", "run", "decode text with a MoE checkpoint"),
    "pack": ("moe_runtime.cli.pack", "add_arguments", "run",
             "pack a checkpoint's experts into one file for --expert-source disk:FILE"),
    "make-tiny": ("moe_runtime.cli.tiny", "add_arguments", "run",
                  "write a tiny random MoE checkpoint (no download)"),
    "calibrate": ("moe_runtime.cli.predictors", "add_calibrate_arguments", "run_calibrate",
                  "fit early-aligned residual adapters for the aligned predictor"),
    "eval-predictors": ("moe_runtime.cli.predictors", "add_eval_arguments", "run_eval",
                        "recall/precision of expert predictors per distance"),
    "serve": ("moe_runtime.cli.serve", "add_arguments", "run",
              "an OpenAI-compatible HTTP server with continuous batching (the serve extra)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="moe-runtime", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = {}
    for name, (module, add, run, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        p.set_defaults(_run=getattr(mod, run))
        getattr(mod, add)(p)
        parser.commands[name] = p
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    command = parser.commands.get(argv[0]) if argv else None
    if command is not None and any(a.dest == "config" for a in command._actions):
        # --config FILE: its values become the command's defaults, so flags override them
        _config(command, argv[1:])
    args = parser.parse_args(argv)
    run_cli(lambda: args._run(args), "moe-runtime")


def _config(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    try:
        apply_config(parser, argv)
    except MoeError as e:  # one line, as for any refused flag
        _error("moe-runtime", f"--config: {e}")
        sys.exit(2)


if __name__ == "__main__":
    main()
