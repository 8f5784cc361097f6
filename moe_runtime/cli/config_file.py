"""``--config FILE``: a command's options from a YAML file (a plan from `moe-sim plan`), flags overriding it.

Contract, for any subcommand that calls ``add_config_argument`` (``generate``;
``serve`` can do the same):

- The file is a YAML mapping read with ``yaml.safe_load`` (``core.config_files``);
  its keys are the command's option names (argparse dests, the options'
  field names: ``budget``, ``eviction``, ``miss_policy``, ...). An
  ``expected:`` mapping (what a plan predicts) is kept aside, not applied. Any
  other key the command does not have is refused, naming it.
- Each value is checked as its flag's text would be (the flag's type and
  choices); ``null`` leaves the option at None.
- The file's values become the command's defaults, so a flag on the command
  line overrides the file; ``args.config_sources`` maps each file key to
  ``file`` or ``command line`` (the one whose value the run uses), and
  ``describe_sources`` turns it into the line the run prints.

``parse_args(parser, argv, subparsers)`` does the parsing for the program's
top-level parser. This module imports no torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_runtime.core import config_files
from moe_runtime.core.config_files import names, short
from moe_runtime.core.errors import MoeError

EXPECTED = "expected"


def add_config_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", default=None,
                   help="read options from this YAML file (e.g. one written by `moe-sim plan`); flags given here "
                        "override it")


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> its first action (hidden aliases share a dest), without help and --config itself."""
    out: dict[str, argparse.Action] = {}
    for a in parser._actions:
        if a.dest in (argparse.SUPPRESS, "help", "config") or isinstance(a, argparse._HelpAction):
            continue
        out.setdefault(a.dest, a)
    return out


def _convert(key: str, value, action: argparse.Action):
    """``value`` as the flag's parsing would give it; MoeError naming the key otherwise."""
    if value is None:
        return None
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise MoeError(f"{key} must be true or false, got {short(value)}")
        return value
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [_convert_one(key, v, action) for v in items]
    if isinstance(value, (list, dict)):
        raise MoeError(f"{key} must be a single value, got {short(value)}")
    return _convert_one(key, value, action)


def _convert_one(key: str, value, action: argparse.Action):
    if isinstance(value, (list, dict, bool)) and action.type is not None:
        raise MoeError(f"{key} must be a single value, got {short(value)}")
    try:
        v = action.type(str(value)) if action.type is not None else str(value)
    except argparse.ArgumentTypeError as e:
        raise MoeError(f"{key}: {e}") from None
    except (ValueError, TypeError):  # a plain type (int, float): its message would name the Python call
        kind = getattr(action.type, "__name__", "value")
        raise MoeError(f"{key} must be {'an integer' if kind == 'int' else 'a number' if kind == 'float' else 'a ' + kind}"
                       f", got {short(value)}") from None
    if action.choices is not None and v not in action.choices:
        raise MoeError(f"{key} must be one of {', '.join(map(str, action.choices))}, got {short(value)}")
    return v


def load_config(path, parser: argparse.ArgumentParser) -> dict:
    """The file's option values for ``parser``'s command, converted; ``expected`` left out."""
    actions = _actions(parser)

    def parse(doc) -> dict:
        if not isinstance(doc, dict):
            raise MoeError("must be a mapping of option: value")
        doc = {str(k): v for k, v in doc.items()}
        if EXPECTED in doc and not isinstance(doc[EXPECTED], dict):
            raise MoeError(f"{EXPECTED} must be a mapping")
        unknown = sorted(k for k in doc if k != EXPECTED and k not in actions)
        if unknown:
            raise MoeError(f"unknown option(s) {names(unknown)} for `{parser.prog}`; keys are option names "
                           f"(e.g. {', '.join(list(actions)[:4])}), and {EXPECTED}: holds a plan's predictions")
        return {k: _convert(k, v, actions[k]) for k, v in doc.items() if k != EXPECTED}

    return config_files.load_yaml(Path(path), parse)


def _config_path(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--config":
            return argv[i + 1] if i + 1 < len(argv) else None
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None,
               subparsers: dict[str, argparse.ArgumentParser]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with the chosen subcommand's ``--config`` file as its defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = next((a for a in argv if not a.startswith("-")), None)
    sub = subparsers.get(cmd)
    path = _config_path(argv[argv.index(cmd) + 1:]) if sub is not None and "config" in {
        a.dest for a in sub._actions} else None
    if path is None:
        args = parser.parse_args(argv)
        if getattr(args, "config", None):  # an abbreviated spelling argparse accepted
            raise MoeError("spell --config in full")
        args.config_sources = {}
        return args
    values = load_config(path, sub)
    sub.set_defaults(**values)
    for a in sub._actions:  # what the file gives is no longer required on the command line
        if a.dest in values and values[a.dest] is not None:
            a.required = False
    for g in sub._mutually_exclusive_groups:
        if any(a.dest in values and values[a.dest] is not None for a in g._group_actions):
            g.required = False
    args = parser.parse_args(argv)
    args.config_sources = {k: "file" if getattr(args, k) == v else "command line" for k, v in values.items()}
    return args


def describe_sources(args: argparse.Namespace) -> str | None:
    """One line: which option values came from the --config file and which from the command line."""
    src = getattr(args, "config_sources", None)
    if not src:
        return None
    parts = {w: [f"{k}={getattr(args, k)}" for k, s in src.items() if s == w] for w in ("file", "command line")}
    line = f"config {args.config}: from the file: {' '.join(parts['file']) or 'nothing'}"
    if parts["command line"]:
        line += f"; from the command line instead: {' '.join(parts['command line'])}"
    return line
