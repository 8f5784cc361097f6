"""The CLI reference, docs/cli.md, generated from the parsers the commands run.

``python3 docs/cli_reference.py`` rewrites docs/cli.md from each
command's ``build_parser()`` (``moe-runtime``, ``moe-sim``, ``moe-trace``): per
subcommand its usage line and a table of its arguments with their help and
defaults, so the reference cannot drift from the flags. ``--check`` writes
nothing and exits 1 when docs/cli.md differs from what would be generated
(tests/test_docs.py runs the same comparison). Flags hidden from ``--help``
(old spellings) are left out. The text does not depend on the terminal.

It lives beside the docs, outside both packages, because it imports both
command lines: ``moe_runtime`` never imports ``simulator``. It documents the
checkout it sits in, whatever is installed.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's code, not an installed copy

from moe_runtime.core.outputs import write_text_atomic  # noqa: E402
DOC = ROOT / "docs" / "cli.md"

# program -> module with build_parser(), in the order the reference lists them
PROGRAMS = {
    "moe-runtime": "moe_runtime.cli.runtime",
    "moe-sim": "simulator.cli",
    "moe-trace": "moe_runtime.cli.trace",
}

HEADER = """\
# Command-line reference

Generated from the commands' own parsers by `python3 docs/cli_reference.py`;
do not edit by hand (`python3 docs/cli_reference.py --check` and
tests/test_docs.py fail when this file is stale). Every command also takes
`--help`. Bad input prints one line `PROG: error: ...` and exits 2.
"""


def subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.ArgumentParser, str]]:
    """name -> (subparser, its one-line help), in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return {name: (p, helps.get(name, "")) for name, p in action.choices.items()}
    return {}


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _metavar(action: argparse.Action) -> str:
    if action.metavar:
        return str(action.metavar)
    if action.choices:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return action.dest.upper() if action.option_strings else action.dest


def _usage_item(action: argparse.Action) -> str:
    """``--flag METAVAR``, ``--switch`` or ``POSITIONAL``, as argparse writes it in a usage line."""
    if not action.option_strings:
        return _metavar(action)
    flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0]
    return flag if action.nargs == 0 else f"{flag} {_metavar(action)}"


def usage(prog: str, parser: argparse.ArgumentParser) -> str:
    """Required options in parser order (a required either-or group in parentheses), ``[options]``
    for the rest, positionals last: one stable line, whatever the Python version's argparse wraps."""
    groups = {id(a): g for g in parser._mutually_exclusive_groups for a in g._group_actions}
    required, positional, optional, seen = [], [], False, set()
    for action in parser._actions:
        if action.help is argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        group = groups.get(id(action))
        if group is not None and group.required:
            if id(group) not in seen:
                seen.add(id(group))
                required.append("(" + " | ".join(_usage_item(a) for a in group._group_actions) + ")")
        elif not action.option_strings:
            positional.append(_metavar(action))
        elif action.required:
            required.append(_usage_item(action))
        else:
            optional = True
    return " ".join([prog, *required] + (["[options]"] if optional else []) + positional)


def _meaning(action: argparse.Action, formatter: argparse.HelpFormatter) -> str:
    """The flag's help; its default appended when the help does not state it already (a default
    the help words itself, such as "cuda when available", is not one value on every machine)."""
    text = formatter._expand_help(action) if action.help else ""
    if action.required and action.option_strings:
        text += " (required)"
    d = action.default
    if (action.option_strings and action.nargs != 0 and not action.required and "default" not in text
            and d is not None and d is not argparse.SUPPRESS):
        text += f" (default: {d if d != '' else repr(d)})"
    return _cell(text)


def command_section(prog: str, name: str, parser: argparse.ArgumentParser, help_text: str) -> str:
    formatter = argparse.HelpFormatter(parser.prog)
    rows = []
    for action in parser._actions:
        if action.help is argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        item = _usage_item(action) if action.option_strings else _metavar(action)
        rows.append(f"| `{_cell(item)}` | {_meaning(action, formatter)} |")
    out = [f"### `{prog} {name}`", ""]
    if help_text:
        out += [_cell(help_text[0].upper() + help_text[1:]) + ".", ""]
    out += ["```", usage(f"{prog} {name}", parser), "```", ""]
    if rows:
        out += ["| argument | meaning |", "|---|---|", *rows, ""]
    return "\n".join(out)


def generate() -> str:
    """The full text of docs/cli.md."""
    parts = [HEADER]
    for prog, module in PROGRAMS.items():
        parser = importlib.import_module(module).build_parser()
        subs = subcommands(parser)
        parts.append(f"## `{prog}`\n\n{_cell(parser.description or '')}\n\n"
                     + "Subcommands: " + ", ".join(f"[`{n}`](#{_anchor(prog, n)})" for n in subs) + ".\n")
        parts += [command_section(prog, n, p, h) for n, (p, h) in subs.items()]
    return "\n".join(parts).rstrip("\n") + "\n"


def _anchor(prog: str, name: str) -> str:
    """GitHub's anchor for the heading ``### `prog name` ``."""
    return f"{prog}-{name}".lower()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 docs/cli_reference.py", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md is not what would be generated")
    args = ap.parse_args(argv)
    text = generate()
    current = DOC.read_text() if DOC.exists() else ""
    if args.check:
        if current == text:
            print(f"{DOC.relative_to(ROOT)} is up to date")
            return 0
        sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                                   "docs/cli.md", "generated", n=1))
        print(f"{DOC.relative_to(ROOT)} is stale: run python3 docs/cli_reference.py", file=sys.stderr)
        return 1
    DOC.parent.mkdir(exist_ok=True)
    write_text_atomic(DOC, text)
    print(f"wrote {DOC.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
