"""How the command-line entry points report user errors: one clear message, exit 2, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from tsdia.errors import EXIT_INTERRUPTED, EXIT_USAGE, TsdiaError


def run_cli(prog: str, run: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """Call `run(argv)`; a `TsdiaError` becomes `prog: error: ...` and exit 2 (a traceback with --debug)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except TsdiaError as err:
        if "--debug" in args:
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: aborted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
