"""One error style for every command line: `prog: error: <what went wrong, and what to do>`, exit status 2.

Library code raises UserError (or a subclass) for problems the user can fix: a missing file, a malformed input, a
bad option. `run_cli(main, prog)` turns them, the OS errors of files the user named, and the few library exceptions
that mean a full disk, a denied permission or a file cut short (`known_fault`) into that one line. Anything else is a
bug and keeps its traceback.

Under run_cli, SIGTERM (a time limit, `kill`) ends the program as an exception does, with exit status 143: `finally`
blocks remove temporary files, subprocess.run ends its child (wget), a DataLoader its workers, so nothing is left
running.
"""
import errno
import signal
import sys
from typing import Any, Callable, Iterator, Optional

EXIT_USER_ERROR = 2  # argparse's own status for bad arguments

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NO_PERMISSION = (errno.EACCES, errno.EPERM)
NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded")
# What a file cut short makes numpy's memmap, pickle and torch.load say (the latter for the legacy and zip formats).
CUT_SHORT_TEXT = {ValueError: ("mmap length is greater than file size",),
                  EOFError: ("Ran out of input",),
                  RuntimeError: ("unexpected EOF", "failed finding central directory")}


class UserError(ValueError):
    """Bad input the user can fix; the message says what, and what to do."""


def error_chain(error: BaseException) -> Iterator[BaseException]:
    """`error`, then the exceptions it was raised from or while handling (__cause__, __context__), each once."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def is_disk_full(error: BaseException) -> bool:
    """Whether `error`, or an exception it was raised from or while handling, says the disk (or the user's quota)
    is full: an OSError with ENOSPC or EDQUOT, or a library's error carrying the OS's words for it."""
    return any(isinstance(e, OSError) and e.errno in NO_SPACE or any(t in str(e) for t in NO_SPACE_TEXT)
               for e in error_chain(error))


def known_fault(error: BaseException) -> Optional[str]:
    """The one-line message for a library exception that means a full disk, a denied permission or a file cut
    short; None for anything else (a bug, which keeps its traceback)."""
    if not isinstance(error, (OSError, RuntimeError, ValueError, EOFError)):
        return None
    chain = list(error_chain(error))
    if is_disk_full(error):
        return f"no space left on the device ({error}): free some space, or write to another disk, and run again"
    denied = [e for e in chain if isinstance(e, OSError) and e.errno in NO_PERMISSION]
    if denied:
        return f"permission denied ({denied[0]}): check the file's and its folder's permissions, or use another path"
    if any(type(error) is kind and any(t in str(error) for t in texts) for kind, texts in CUT_SHORT_TEXT.items()):
        return f"a file was cut short ({type(error).__name__}: {error}): an interrupted download or copy, or a disk " \
               "that filled up while it was written; delete it, or write it again"
    return None


def exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)  # the status a shell reports for a process the signal ended


def run_cli(main: Callable[[], Any], prog: str) -> None:
    """Runs `main()` and exits with its return value when that is an int, else 0; a UserError, an OSError or a
    known_fault ends in one line on stderr and exit status EXIT_USER_ERROR, without a traceback; SIGTERM raises
    SystemExit(143). Printing never fails on a file name that is not valid UTF-8."""
    for stream in (sys.stdout, sys.stderr):  # file names that are not valid UTF-8 print as \x.. escapes
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    previous = signal.signal(signal.SIGTERM, exit_on_signal)
    try:
        status = main()
    except UserError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except (OSError, RuntimeError, ValueError, EOFError) as error:
        message = known_fault(error)
        if message is None and not isinstance(error, OSError):
            raise
        print(f"{prog}: error: {message or error}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.exit(status if isinstance(status, int) else 0)
