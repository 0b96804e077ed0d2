"""Small file helpers shared by every problem: checksums, whole-or-nothing writes, early checks of output paths,
reading JSON and PyTorch files with errors that name the file, prediction keys, and paths written without this
machine's absolute locations (the repository's folder, the cache root).

Names that are not valid UTF-8 (e.g. from a zip made on another system) reach Python as strings with "surrogate
escapes" (os.fsdecode). Text outputs keep them exactly: CSV files are written with errors="surrogateescape" (the
file name's own bytes), JSON with ASCII escapes (json.load gives back the very string the file system gave).
"""
import csv
import hashlib
import json
import os
import pickle
import re
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Sequence, Tuple

import torch

from hw3.common.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_VARIABLE = "HW3_CACHE"  # where the toy worlds live (default ~/.cache/dlcv-hw3), shared with the tests
DEFAULT_CACHE = "~/.cache/dlcv-hw3"
ABSOLUTE_PATH = re.compile(r"(?<![\w.~$/])/[^\s,;()\[\]{}\"']+")  # not the "/32" of "ViT-B/32"


def sha256_file(path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_writable(path, kind: str = "file") -> None:
    """Raises UserError unless `path` can be written as a `kind` ("file" or "folder") later: run it before the work,
    so a bad output path fails in a second, not after an hour. Missing parents are fine (they are created)."""
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise UserError(f"output {path} is a folder: give a file path")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise UserError(f"output folder {path} is a file: give a folder path")
    ancestor = path.parent if kind == "file" else path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot create {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: no write permission in {ancestor}")


def write_together(writes: Sequence[Tuple[Any, Callable[[str], None]]]) -> None:
    """Several files as one change: each `write(temporary path)` beside its target first, then every rename. When a
    write fails (a full disk, an interruption), every temporary is removed and each target stays as it was; only
    the renames, which need no space, lie between the previous set of files and the new one. Creates the parent
    folders."""
    pending = []  # (temporary, target)
    try:
        for path, write in writes:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            pending.append((f"{path}.{os.getpid()}.tmp", path))
            write(pending[-1][0])
        for temporary, path in pending:
            os.replace(temporary, path)
    finally:
        for temporary, _ in pending:
            if os.path.exists(temporary):
                os.remove(temporary)


def write_atomically(path, write: Callable[[str], None]) -> None:
    """write(temporary path) beside `path`, then one atomic rename: an interruption or a failing `write` never leaves
    a half-written file at `path` (a previous file there stays as it was). Creates the parent folder."""
    write_together([(path, write)])


def text_writer(text: str) -> Callable[[str], None]:
    """A `write` for write_atomically / write_together: `text` as UTF-8."""
    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)
    return write


def json_writer(data: Any, **options) -> Callable[[str], None]:
    """A `write` for write_atomically / write_together: JSON with ASCII escapes for anything outside ASCII, so every
    string, file names with surrogate escapes included, loads back exactly."""
    return text_writer(json.dumps(data, ensure_ascii=True, **options))


class _QuietFile:
    """The file object torch.save writes to: it never raises into torch, and keeps the first write error for
    save_torch to raise once torch.save has returned."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        if self.error is None:
            try:
                self.file.write(data)
            except OSError as error:
                self.error = error
        return len(data)

    def flush(self) -> None:
        if self.error is None:
            try:
                self.file.flush()
            except OSError as error:
                self.error = error


def save_torch(obj: Any, path) -> None:
    """torch.save(obj) to `path`; a failed write (a full disk) raises its OSError after torch.save has returned.
    torch 1.12 cannot fail a write safely: its zip writer raises, then throws again in its destructor, and that
    aborts the whole process (std::terminate) instead of reaching any handler."""
    with open(path, "wb") as file:
        quiet = _QuietFile(file)
        torch.save(obj, quiet)
        if quiet.error is not None:
            raise quiet.error


def write_text_atomically(path, text: str) -> None:
    write_atomically(path, text_writer(text))


def write_json_atomically(path, data: Any, **options) -> None:
    """JSON with ASCII escapes for anything outside ASCII (json_writer)."""
    write_atomically(path, json_writer(data, **options))


def write_csv_atomically(path, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    """A UTF-8 CSV whose cells keep non-UTF-8 file names as their original bytes (surrogateescape)."""
    def write(temporary: str) -> None:
        with open(temporary, "w", newline="", encoding="utf-8", errors="surrogateescape") as file:
            writer = csv.writer(file)
            writer.writerow(header)
            writer.writerows(rows)
    write_atomically(path, write)


def read_json(path, what: str = "JSON file") -> Any:
    """The parsed file; a missing, unreadable, cut-off or wrongly encoded one raises UserError naming it."""
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}): save the {what} as "
                        "UTF-8") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}; a "
                        f"cut-off download?): expected a {what}") from None
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None


def load_torch_file(path, what: str) -> Any:
    """What torch.save wrote to `path`, loaded on the CPU. A missing file, an HTML page from a failed download,
    random bytes or a cut-off file raises UserError naming the file and what it is not."""
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu")
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, RuntimeError, ValueError, TypeError,
            AttributeError, ImportError, IndexError, KeyError, UnicodeDecodeError, OSError) as error:
        # OSError: torch's zip reader seeks past the end of a cut-off file (EINVAL)
        raise UserError(f"{path} is not {what}: PyTorch cannot load it ({type(error).__name__}: "
                        f"{str(error)[:200]})") from None


def load_state_dict_file(path, what: str) -> dict:
    """A PyTorch file holding a dict of tensors (a state_dict); anything else (see load_torch_file, and a pickled
    list or any other object) raises UserError naming the file and what it is not."""
    state_dict = load_torch_file(path, what)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"{path} is not {what}: it holds a {type(state_dict).__name__}, not a dict of tensors")
    return state_dict


def image_key(file_name: str) -> str:
    """The prediction key of an image: its file name without the extension (`000123.jpg` -> `000123`)."""
    return os.path.splitext(os.path.basename(file_name))[0]


def cache_root() -> Path:
    """$HW3_CACHE, or ~/.cache/dlcv-hw3: the toy worlds' folder."""
    return Path(os.environ.get(CACHE_VARIABLE) or DEFAULT_CACHE).expanduser()


def shown_path(path) -> str:
    """`path` as a report shows it: inside the cache root as `~/.cache/dlcv-hw3/...` (`$HW3_CACHE/...` when that is
    set), anywhere else relative to the repository (`results/p1`, `../data`); never this machine's absolute path."""
    absolute = Path(os.path.abspath(os.path.expanduser(path)))
    cache = Path(os.path.abspath(cache_root()))
    if absolute == cache or cache in absolute.parents:
        label = f"${CACHE_VARIABLE}" if os.environ.get(CACHE_VARIABLE) else DEFAULT_CACHE
        return str(PurePosixPath(label, absolute.relative_to(cache)))
    return os.path.relpath(absolute, REPO_ROOT)


def shown_text(text: str) -> str:
    """`text` with every absolute path in it written as `shown_path` writes it (a sentence's final full stop stays
    outside the path)."""
    def replace(match: re.Match) -> str:
        path = match.group(0)
        stop = path[len(path.rstrip(".")):]
        return shown_path(path[:len(path) - len(stop)]) + stop
    return ABSOLUTE_PATH.sub(replace, text)
