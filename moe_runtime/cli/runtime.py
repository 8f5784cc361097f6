"""`moe-runtime`: the executor's command line.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only lists them, so flags are defined in one
place per command.
"""

from __future__ import annotations

import argparse
import importlib

from moe_runtime.errors import run_cli

# name -> (module, one-line help)
COMMANDS = {
    "profile": ("moe_runtime.offload.profile", "measure copy bandwidth/latency and MoE layer compute; write a device YAML"),
    "generate": ("moe_runtime.cli.generate", "decode text with a MoE checkpoint"),
    "make-tiny": ("moe_runtime.model.tiny", "write a tiny random MoE checkpoint (no download)"),
    "calibrate": ("moe_runtime.predictors.calibrate", "fit early-aligned residual adapters for the aligned predictor"),
    "eval-predictors": ("moe_runtime.predictors.evaluate", "recall/precision of expert predictors per distance"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-runtime", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run_cli(lambda: importlib.import_module(args._module).run(args), "moe-runtime")


if __name__ == "__main__":
    main()
