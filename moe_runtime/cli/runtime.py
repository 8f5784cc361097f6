"""`moe-runtime`: the executor's command line.

Each subcommand's flags and entry point live in a module of this package (or,
for ``profile`` and ``make-tiny``, beside the code they run) as
``add_...(parser)`` and ``run...(args) -> int``; this file only lists them, so
flags are defined in one place per command.
"""

from __future__ import annotations

import argparse
import importlib

from moe_runtime.cli import config_file
from moe_runtime.core.errors import ArgumentParser, run_cli

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
    parser.subcommands = {}  # name -> its parser (config_file.parse_args reads the chosen one's --config)
    for name, (module, add, run, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        p.set_defaults(_run=getattr(mod, run))
        getattr(mod, add)(p)
        parser.subcommands[name] = p
    return parser


def main(argv: list[str] | None = None) -> None:
    def body():
        parser = build_parser()  # inside: Ctrl-C while it imports torch is one line too
        args = config_file.parse_args(parser, argv, parser.subcommands)  # a bad --config file is one line too
        return args._run(args)
    run_cli(body, "moe-runtime")


if __name__ == "__main__":
    main()
