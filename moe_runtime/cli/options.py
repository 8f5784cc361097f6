"""Command-line flags built from an options dataclass (``cache/options.py``): one definition, every CLI.

``add_option_flags(group, cls)`` adds a flag per field of ``cls`` that carries
one (name, type, choices from the registries, help with the default, hidden
aliases); ``options_from_args(cls, args)`` builds the dataclass back, so its
validation is the one that runs. Imports no torch.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

from moe_runtime.cache.options import predictor_names


def option_fields(cls) -> list:
    return [f for f in fields(cls) if "flag" in f.metadata]


def add_option_flags(group, cls, *, default_note: dict[str, str] | None = None,
                     executor: bool = True) -> None:
    """Add ``cls``'s flags to ``group``. ``default_note`` replaces a field's "(default: X)" text;
    ``executor`` False lists only the predictors the simulator can run."""
    for f in option_fields(cls):
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
        group.add_argument(m["flag"], dest=f.name, type=m["type"], default=default, metavar=f.name.upper(),
                           help=text)
        for alias in m["aliases"]:  # old spellings keep working, out of the help
            group.add_argument(alias, dest=f.name, type=m["type"], default=default, help=argparse.SUPPRESS)


def options_from_args(cls, args: argparse.Namespace, **extra):
    """``cls`` built from the parsed flags (its ``__post_init__`` validates) plus ``extra`` fields."""
    return cls(**{f.name: getattr(args, f.name) for f in option_fields(cls)}, **extra)
