"""Fetches the trained checkpoints and pre-loads the pretrained backbones: what `bash hw3_download.sh` runs.

checkpoints.json is the one place that lists them:

    {"checkpoints": [{"name", "path" (relative to --dest-root), "url", "sha256", "made_by"}],
     "backbones":   [{"library": "clip" or "timm", "name"}]}

A checkpoint is fetched with `wget -O` (`gdown --fuzzy URL -O` for Google Drive links) into a private temporary
folder beside its destination, its sha256 is checked, and only then is it renamed into place (one atomic rename), so
an interrupted or corrupt download never leaves a file at the destination. A file already there with the right sha256
is kept and nothing is requested; one with another sha256 is replaced by the published file and kept as `<path>.old`.
An entry whose url is still empty has not been published yet: it is reported, and is fine only if the file is
already there (trained locally). Publishing one: upload the file, then fill in its url and `sha256sum` in the manifest.

Backbones (OpenAI CLIP via `clip.load`, timm via `timm.create_model(pretrained=True)`) are loaded once so that their
weights sit in the usual caches (~/.cache/clip, ~/.cache/huggingface) before the graded scripts run. They come after
the checkpoints, and every item is attempted even when an earlier one failed.

Exit status: 0 every checkpoint present and verified and every backbone cached; 1 a download, checksum or backbone
failed; 2 bad command line or manifest; 3 nothing failed, but a checkpoint is not published yet and not present.
"""
import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import List, Tuple
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent
OK, FAILED, BAD_INPUT, NOT_PUBLISHED = 0, 1, 2, 3
BACKBONE_LIBRARIES = ("clip", "timm")


@dataclass
class Checkpoint:
    name: str
    path: str  # relative to the destination root (the repo root by default)
    url: str = ""  # empty until published
    sha256: str = ""
    made_by: str = ""  # what produces it, for the "not published yet" message


@dataclass
class Backbone:
    library: str  # "clip" or "timm"
    name: str


class ManifestError(ValueError):
    pass


def parse_checkpoint(entry: dict) -> Checkpoint:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("path"), str):
        raise ManifestError(f"a checkpoint entry needs a 'name' and a 'path': {entry!r}")
    checkpoint = Checkpoint(entry["name"], entry["path"], entry.get("url") or "", (entry.get("sha256") or "").lower(),
                            entry.get("made_by") or "")
    path = PurePosixPath(checkpoint.path)
    if path.is_absolute() or ".." in path.parts or not path.name:
        raise ManifestError(f"{checkpoint.name}: path must be relative and stay inside the destination root: {path}")
    if checkpoint.url and not re.fullmatch(r"[0-9a-f]{64}", checkpoint.sha256):
        raise ManifestError(f"{checkpoint.name}: a published checkpoint needs its sha256 (64 hex digits), "
                            f"got {checkpoint.sha256!r}")
    return checkpoint


def parse_backbone(entry: dict) -> Backbone:
    if not isinstance(entry, dict) or entry.get("library") not in BACKBONE_LIBRARIES \
            or not isinstance(entry.get("name"), str):
        raise ManifestError(f"a backbone entry needs 'library' (one of {BACKBONE_LIBRARIES}) and 'name': {entry!r}")
    return Backbone(entry["library"], entry["name"])


def load_manifest(path: Path) -> Tuple[List[Checkpoint], List[Backbone]]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ManifestError(f"cannot read manifest {path}: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("checkpoints", []), list) \
            or not isinstance(data.get("backbones", []), list):
        raise ManifestError(f"{path}: expected an object with lists 'checkpoints' and 'backbones'")
    return ([parse_checkpoint(entry) for entry in data.get("checkpoints", [])],
            [parse_backbone(entry) for entry in data.get("backbones", [])])


def checkpoint_path(name: str, manifest: Path = ROOT / "checkpoints.json", dest_root: Path = ROOT) -> Path:
    """Where checkpoint `name` lives once hw3_download.sh has fetched it: the default for the inference code."""
    checkpoints, _ = load_manifest(manifest)
    for checkpoint in checkpoints:
        if checkpoint.name == name:
            return dest_root / checkpoint.path
    raise ManifestError(f"{manifest} has no checkpoint named {name!r}: {[c.name for c in checkpoints]}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_google_drive(url: str) -> bool:
    return urlparse(url).hostname in ("drive.google.com", "docs.google.com", "drive.usercontent.google.com")


def fetch_command(url: str, out: Path) -> List[str]:
    """The download command: gdown for Google Drive links (it handles the virus-scan page), wget for the rest."""
    if is_google_drive(url):
        return [sys.executable, "-m", "gdown", "--fuzzy", url, "-O", str(out)]
    return ["wget", "--no-verbose", "--show-progress", "--progress=bar:force:noscroll", "--tries=3", "--timeout=60",
            "-O", str(out), url]


def fetch_checkpoint(checkpoint: Checkpoint, dest_root: Path) -> int:
    """Makes `dest_root / checkpoint.path` hold the published file; returns OK, FAILED or NOT_PUBLISHED."""
    name, dest = checkpoint.name, dest_root / checkpoint.path
    if not checkpoint.url:
        if dest.is_file():
            print(f"{name}: {dest} is present (trained here; not published, so no sha256 to check it against)")
            return OK
        print(f"{name}: not published yet: train it with {checkpoint.made_by or 'the training script'}, see README "
              f"(it goes to {dest})", file=sys.stderr)
        return NOT_PUBLISHED
    if dest.is_file():
        if sha256_of(dest) == checkpoint.sha256:
            print(f"{name}: {dest} is already present, sha256 verified; nothing downloaded")
            return OK
        print(f"{name}: {dest} has another sha256 than the published file; fetching that one")

    dest.parent.mkdir(parents=True, exist_ok=True)
    # A private folder on the destination's filesystem: the rename below is atomic, and whatever the downloader
    # leaves behind (wget's empty file on a 404, gdown's .part files) goes with the folder.
    work_dir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.download-", dir=dest.parent))
    try:
        download = work_dir / dest.name
        command = fetch_command(checkpoint.url, download)
        if shutil.which(command[0]) is None:
            print(f"{name}: {command[0]} is not installed; install it or fetch {checkpoint.url} to {dest} by hand",
                  file=sys.stderr)
            return FAILED
        print(f"{name}: {shlex.join(command)}", flush=True)
        returncode = subprocess.run(command).returncode
        if returncode != 0 or not download.is_file():
            print(f"{name}: download FAILED ({command[0]} exit status {returncode}) from {checkpoint.url}",
                  file=sys.stderr)
            return FAILED
        actual = sha256_of(download)
        if actual != checkpoint.sha256:
            print(f"{name}: sha256 MISMATCH, download discarded: expected {checkpoint.sha256}, got {actual} "
                  f"from {checkpoint.url}", file=sys.stderr)
            return FAILED
        if dest.is_file():
            os.replace(dest, dest.with_name(dest.name + ".old"))
            print(f"{name}: the previous file is kept as {dest.name}.old")
        os.replace(download, dest)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(f"{name}: wrote {dest} (sha256 verified)")
    return OK


def preload_backbone(backbone: Backbone) -> int:
    """Loads the pretrained weights once so they are cached; returns OK or FAILED."""
    label = f"{backbone.library} {backbone.name}"
    print(f"backbone {label}: loading (downloads into its cache on the first run)", flush=True)
    try:
        if backbone.library == "clip":
            import clip
            if backbone.name not in clip.available_models():
                raise ValueError(f"unknown CLIP model; available: {clip.available_models()}")
            clip.load(backbone.name, device="cpu", jit=False)
        else:
            import timm
            timm.create_model(backbone.name, pretrained=True)
    except Exception as error:  # a broken backbone must not hide the others, so report it and go on
        print(f"backbone {label}: FAILED: {type(error).__name__}: {error}", file=sys.stderr)
        return FAILED
    print(f"backbone {label}: cached")
    return OK


def overall_status(statuses: List[int]) -> int:
    if FAILED in statuses:
        return FAILED
    return NOT_PUBLISHED if NOT_PUBLISHED in statuses else OK


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Fetch the trained checkpoints (sha256-verified) and pre-load the pretrained backbones.",
        epilog="Exit status: 0 all done; 1 a download, checksum or backbone failed; 2 bad arguments or manifest; "
               "3 a checkpoint is not published yet and not present.")
    parser.add_argument("--manifest", type=Path, default=ROOT / "checkpoints.json",
                        help="the list of checkpoints and backbones (default: %(default)s)")
    parser.add_argument("--dest-root", type=Path, default=ROOT,
                        help="folder that the checkpoint paths are relative to (default: the repo root)")
    parser.add_argument("--skip-backbones", action="store_true", help="only fetch the checkpoints")
    args = parser.parse_args(argv)
    try:
        checkpoints, backbones = load_manifest(args.manifest)
    except ManifestError as error:
        print(f"error: {error}", file=sys.stderr)
        return BAD_INPUT

    statuses = [fetch_checkpoint(checkpoint, args.dest_root) for checkpoint in checkpoints]
    if not args.skip_backbones:
        statuses += [preload_backbone(backbone) for backbone in backbones]
    status = overall_status(statuses)
    summary = {OK: "all done", FAILED: "FAILED (see the messages above)",
               NOT_PUBLISHED: "incomplete: a checkpoint is not published yet (see above)"}[status]
    print(f"hw3_download: {summary}; checkpoints under {args.dest_root.resolve()}")
    return status


if __name__ == "__main__":
    sys.exit(main())
