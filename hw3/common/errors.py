"""One error style for every command line: `prog: error: <what went wrong, and what to do>`, exit status 2.

Library code raises UserError (or a subclass) for problems the user can fix: a missing file, a malformed input, a
bad option. `run_cli(main, prog)` turns them, and the OS errors of files the user named, into that one line.
Anything else is a bug and keeps its traceback.
"""
import sys
from typing import Any, Callable

EXIT_USER_ERROR = 2  # argparse's own status for bad arguments


class UserError(ValueError):
    """Bad input the user can fix; the message says what, and what to do."""


def run_cli(main: Callable[[], Any], prog: str) -> None:
    """Runs `main()` and exits with its return value when that is an int, else 0; a UserError or OSError ends in
    one line on stderr and exit status EXIT_USER_ERROR, without a traceback. Printing never fails on a file name
    that is not valid UTF-8."""
    for stream in (sys.stdout, sys.stderr):  # file names that are not valid UTF-8 print as \x.. escapes
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        status = main()
    except (UserError, OSError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    sys.exit(status if isinstance(status, int) else 0)
