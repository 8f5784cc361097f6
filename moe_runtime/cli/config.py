"""``--config FILE``: a YAML mapping of a command's option values, under the flags' own names (their dests
or the long flags with underscores, e.g. ``expert_budget: 50%``, ``max_batch: 16``); a flag on the command line overrides the file.

Contract: ``add_config_flag(parser)`` adds the flag; ``apply_config(parser, argv)`` (called by
``cli/runtime.main`` before parsing, for commands with the flag) reads the file named in ``argv`` and
makes its values the parser's defaults. Values go through the flags' own types and choices (a string is
parsed as if typed on the command line), so a config file is checked exactly as the flags are; a key that
names no flag, a list, a mapping, or a value for a switch that is not true/false is refused naming the
file and the key. Any command can take it by calling ``add_config_flag``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moe_runtime.core.config_files import load_yaml, names, short
from moe_runtime.core.errors import MoeError

NOT_CONFIGURABLE = ("help", "config", "_run")


def add_config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help="YAML file of option values under the flags' names (e.g. max_batch: 16); flags override it")


def config_path(argv: list[str]) -> str | None:
    """The value of the last ``--config`` in ``argv`` (``--config F`` or ``--config=F``), else None."""
    path = None
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
    return path


def apply_config(p: argparse.ArgumentParser, argv: list[str]) -> None:
    path = config_path(argv)
    if path is None:
        return
    actions = {}
    for a in p._actions:
        if a.dest not in NOT_CONFIGURABLE and a.option_strings and a.help != argparse.SUPPRESS:
            actions[a.dest] = a
            for flag in a.option_strings:  # the flag's own name too: expert_budget for --expert-budget
                if flag.startswith("--"):
                    actions.setdefault(flag[2:].replace("-", "_"), a)
    values = load_yaml(Path(path), lambda doc: _values(doc, actions))
    for dest, value in values.items():
        actions[dest].required = False  # given by the file; the command line may still override it
    p.set_defaults(**values)


def _values(doc, actions: dict) -> dict:
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise MoeError("must be a mapping of option names to values")
    out = {}
    for key, value in doc.items():
        if key in actions and actions[key].dest in out:
            raise MoeError(f"{key} is given twice (as {actions[key].dest} too)")
        if key not in actions:
            raise MoeError(f"unknown option {short(key)} (known: {names(sorted(actions), 8)})")
        action = actions[key]
        if action.nargs == 0:  # a switch (store_true/store_false)
            if not isinstance(value, bool):
                raise MoeError(f"{key} must be true or false, got {short(value)}")
            out[action.dest] = value
            continue
        if isinstance(value, (list, dict)) or isinstance(action, argparse._AppendAction):
            raise MoeError(f"{key} takes one value (a string or a number), got {short(value)}")
        if value is None:
            out[action.dest] = None
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if action.type is not None:
            try:
                action.type(text)
            except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
                raise MoeError(f"{key}: {e}") from None
        if action.choices is not None and (action.type or str)(text) not in action.choices:
            raise MoeError(f"{key} must be one of {', '.join(map(str, action.choices))}, got {short(value)}")
        out[action.dest] = text  # argparse parses a string default with the flag's type, as if typed
    return out
