"""One exception type for bad input, and the CLI wrapper that turns it into one line.

Anything the user can get wrong (a missing file, a malformed trace, config or
checkpoint, a budget too small) raises ``MoeError`` with a message that names
the problem. The command-line entry points print ``error: <message>`` and exit
with status 2; they never show a traceback for such input. A closed stdout
(``| head``) ends the command quietly, as Unix tools do. ``ArgumentParser``
reports a flag argparse refuses the same way: one line, no usage block.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Callable, NoReturn


class MoeError(Exception):
    """Bad input or an impossible request; the message is shown to the user as is."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a refused flag reported as one line ``<prog>: error: ... (see --help)``, exit 2.

    Subcommand parsers inherit the class; the line names the program (``moe-runtime``), as run_cli does.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # "-5%" and "-2GiB" are values (refused by the flag's own check, which says why), not unknown options
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(%|[kmgt]i?b|b)?$", re.IGNORECASE)

    def error(self, message: str) -> NoReturn:
        prog = self.prog.split()[0] if self.prog else "error"
        _error(prog, f"{message} (see {self.prog} --help)")
        sys.exit(2)


def _quiet_stdout() -> None:
    """The reader of stdout left (``| head``): send what is still buffered nowhere, so neither this
    process nor the interpreter's exit complains."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout replaced (tests) or already closed
        pass


def run_cli(fn: Callable[[], int | None], prog: str) -> NoReturn:
    """Run a CLI body, mapping MoeError (and OS/keyboard errors) to one line.

    Exit status: 2 for bad input and OS errors, 130 for Ctrl-C, and 141 (128 + SIGPIPE, what a
    shell reports for a Unix tool killed by SIGPIPE) when stdout's reader went away, silently.
    """
    try:
        code = fn()
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
    except BrokenPipeError:
        _quiet_stdout()
        sys.exit(141)
    except MoeError as e:
        _error(prog, str(e))
        sys.exit(2)
    except FileNotFoundError as e:
        _error(prog, f"file not found: {e.filename or e}")
        sys.exit(2)
    except OSError as e:  # writing or reading failed (disk full, permission, ...): one line
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        _error(prog, f"{e.strerror or type(e).__name__}{where}")
        sys.exit(2)
    except MemoryError:
        _error(prog, "out of memory")
        sys.exit(2)
    except KeyboardInterrupt as e:  # one line; a long run says in its message what it saved
        print(f"{prog}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def _error(prog: str, message: str) -> None:
    """One line, whatever the message holds (a path with a newline, a multi-line library error)."""
    line = " ".join(message.split("\n")).strip()
    try:
        print(f"{prog}: error: {line}", file=sys.stderr)
    except (BrokenPipeError, OSError):
        pass
