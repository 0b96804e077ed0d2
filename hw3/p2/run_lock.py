"""One p2_train.py run per run folder.

A run claims its folder for its lifetime with an exclusive flock on OUT/.lock; the file names the claiming process
(its pid and command line) for the message a second run gets. The kernel drops the lock when the process ends,
however it ends (kill -9 included), so a claim never outlives its run and the next run takes the folder over. The
file stays, except in a folder the claim itself created and nothing else wrote to (a run that failed before it
started): that folder is removed again.

Under torchrun only rank 0 claims: the other ranks of a job are the same run, and when rank 0 is refused, torchrun
ends them with it.
"""
import errno
import fcntl
import os
import shlex
import sys
from pathlib import Path
from typing import IO, List, Optional

from hw3.common.errors import UserError

LOCK_NAME = ".lock"
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # file systems without flock (some network mounts)


class RunFolderLock:
    """`with RunFolderLock(out):` holds the claim on `out` (creating the folder); `active=False` claims nothing."""

    def __init__(self, out, active: bool = True):
        self.out, self.active = Path(out), active
        self.path = self.out / LOCK_NAME
        self.file: Optional[IO[str]] = None
        self.created: List[Path] = []  # the folders the claim created, deepest first

    def __enter__(self) -> "RunFolderLock":
        if self.active:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Claims the folder, or raises UserError naming the process that holds it."""
        for _ in range(10):  # another claim may remove its empty folder between these steps: then again
            missing = [folder for folder in [self.out, *self.out.parents] if not folder.exists()]
            self.out.mkdir(parents=True, exist_ok=True)
            try:
                file = open(self.path, "a+", encoding="utf-8")
            except FileNotFoundError:
                continue
            lock(file, self.out)
            if same_file(file, self.path):
                break
            file.close()
        else:
            raise UserError(f"cannot claim {self.out}: its {LOCK_NAME} keeps being replaced; try again")
        file.truncate(0)
        file.write(f"pid {os.getpid()}: {holder_command()}\n")
        file.flush()
        self.file, self.created = file, missing

    def release(self) -> None:
        """Drops the claim; removes the folders it created when they hold nothing else (unlinked while locked, so a
        run waiting on this file finds it gone and claims anew)."""
        if self.file is None:
            return
        if self.created and left_alone(self.out):
            self.path.unlink()
            for folder in self.created:
                try:
                    folder.rmdir()
                except OSError:  # not empty: another run's folder by now
                    break
        self.file.close()  # drops the lock
        self.file = None


def left_alone(out: Path) -> bool:
    """Whether `out` holds nothing but the lock file."""
    try:
        return os.listdir(out) == [LOCK_NAME]
    except OSError:
        return False


def lock(file: IO[str], out: Path) -> None:
    """Takes the flock on `file`; raises UserError naming the holder when another process has it."""
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "a process that has not written its name yet"
        file.close()
        raise UserError(f"{out} is in use by another p2_train.py run ({holder}): wait for it to end or stop it, or "
                        "choose another --out") from None
    except OSError as error:
        if error.errno not in NO_LOCKS:
            file.close()
            raise
        print(f"warning: {file.name}: this file system has no file locks ({error.strerror}); nothing stops a second "
              "run from writing to the same folder", file=sys.stderr)


def same_file(file: IO[str], path: Path) -> bool:
    """Whether the open `file` is still the one at `path` (a claim that removed it meanwhile leaves a stale inode)."""
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(file.fileno())
    return (opened.st_dev, opened.st_ino) == (at_path.st_dev, at_path.st_ino)


def holder_command() -> str:
    """This process's command line, as the message to a refused run shows it."""
    return " ".join(shlex.quote(word) for word in [os.path.basename(sys.executable)] + sys.argv)
