"""Small file helpers shared by every problem: checksums, whole-or-nothing writes, prediction keys."""
import hashlib
import os
from pathlib import Path
from typing import Callable


def sha256_file(path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomically(path, write: Callable[[str], None]) -> None:
    """write(temporary path) beside `path`, then one atomic rename: an interruption never leaves a half-written
    file at `path`. Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_text_atomically(path, text: str) -> None:
    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)
    write_atomically(path, write)


def image_key(file_name: str) -> str:
    """The prediction key of an image: its file name without the extension (`000123.jpg` -> `000123`)."""
    return os.path.splitext(os.path.basename(file_name))[0]
