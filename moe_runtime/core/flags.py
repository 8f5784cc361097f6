"""Command-line flags built from an options dataclass (``cache/options.py``): one definition, every CLI.

``add_option_flags(group, cls)`` adds a flag per field of ``cls`` that carries
one (name, type, choices from the registries, help with the default, hidden
aliases); ``options_from_args(cls, args)`` builds the dataclass back, so its
validation is the one that runs. ``number(...)`` and ``integer(...)`` are the
argparse types of every other numeric flag: the value must parse, be finite
and lie in the range (``config_files.check_number``, the rule config files
follow), else argparse's one-line error names the flag. Imports no torch.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

from moe_runtime.core.predictors import predictor_names
from moe_runtime.core.config_files import check_number, short
from moe_runtime.core.errors import MoeError

SEED_MAX = 2**32 - 1  # numpy's and the sweep's seed range; torch takes it too


def _typed(parse, kind: str, **limits):
    def convert(text: str):
        try:
            value = parse(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {kind}, got {short(text)}") from None
        try:
            return check_number("value", value, integer=parse is int, **limits)
        except MoeError as e:  # "value must be a number >= 0, got nan" -> "must be ..."
            raise argparse.ArgumentTypeError(str(e).removeprefix("value ")) from None
    convert.__name__ = kind  # argparse names the type in some messages
    return convert


def number(lo=None, hi=None, *, lo_open: bool = False):
    """argparse type: a finite float in the range (``lo`` exclusive when ``lo_open``)."""
    return _typed(float, "a number", lo=lo, hi=hi, lo_open=lo_open)


def integer(lo=None, hi=None):
    """argparse type: an int in the range."""
    return _typed(int, "an integer", lo=lo, hi=hi)


SEED = integer(0, SEED_MAX)


def option_fields(cls) -> list:
    return [f for f in fields(cls) if "flag" in f.metadata]


def add_option_flags(group, cls, *, default_note: dict[str, str] | None = None,
                     executor: bool = True, only: tuple[str, ...] | None = None) -> None:
    """Add ``cls``'s flags to ``group`` (``only``: just these fields). ``default_note`` replaces a field's
    "(default: X)" text; ``executor`` False lists only the predictors the simulator can run."""
    for f in option_fields(cls):
        if only is not None and f.name not in only:
            continue
        m = f.metadata
        default = None if f.default is MISSING else f.default
        choices = m["choices"]() if m["choices"] else None
        text = m["help"].replace("{predictors}", ", ".join(predictor_names(hidden=executor)))
        if choices:
            text += ": " + ", ".join(choices)
        note = (default_note or {}).get(f.name)
        if note is None and default is not None:
            note = str(default).replace("%", "%%")
        if note:
            text += f" (default: {note})"
        group.add_argument(m["flag"], dest=f.name, type=m["type"], default=default,
                           metavar=m.get("metavar") or f.name.upper(),
                           help=text)
        for alias in m["aliases"]:  # old spellings keep working, out of the help
            group.add_argument(alias, dest=f.name, type=m["type"], default=default, help=argparse.SUPPRESS)


def options_from_args(cls, args: argparse.Namespace, **extra):
    """``cls`` built from the parsed flags (its ``__post_init__`` validates) plus ``extra`` fields."""
    return cls(**{f.name: getattr(args, f.name) for f in option_fields(cls)}, **extra)
