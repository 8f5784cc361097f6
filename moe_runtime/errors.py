"""One exception type for bad input, and the CLI wrapper that turns it into one line.

Anything the user can get wrong (a missing file, a malformed trace, config or
checkpoint, a budget too small) raises ``MoeError`` with a message that names
the problem. The command-line entry points print ``error: <message>`` and exit
with status 2; they never show a traceback for such input.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn


class MoeError(Exception):
    """Bad input or an impossible request; the message is shown to the user as is."""


def run_cli(fn: Callable[[], int | None], prog: str) -> NoReturn:
    """Run a CLI body, mapping MoeError (and file/keyboard errors) to one line and exit 2."""
    try:
        code = fn()
    except MoeError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except FileNotFoundError as e:
        print(f"{prog}: error: file not found: {e.filename or e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
