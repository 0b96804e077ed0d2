"""Fetches the trained checkpoints and pre-loads the pretrained backbones that checkpoints.json lists
(hw3/common/manifest.py): what `bash hw3_download.sh` runs.

A checkpoint is fetched with `wget -O` (`gdown --fuzzy URL -O` for Google Drive links) into a private temporary
folder beside its destination, its sha256 is checked, and only then is it renamed into place (one atomic rename), so
an interrupted or corrupt download never leaves a file at the destination. A file already there with the right sha256
is kept and nothing is requested; one with another sha256 is replaced by the published file and kept as `<path>.old`.
An entry whose url is still empty has not been published yet: it is reported, and is fine only if the file is
already there (trained locally). Publishing one: upload the file, then fill in its url and `sha256sum` in the manifest.

Backbones (OpenAI CLIP via `clip.load`, timm via `timm.create_model(pretrained=True)`) are loaded once so that their
weights sit in the usual caches (~/.cache/clip, ~/.cache/huggingface) before the graded scripts run. They come after
the checkpoints, and every item is attempted even when an earlier one failed.

Exit status: OK (0) every checkpoint present and verified and every backbone cached; FAILED (1) a download, checksum
or backbone failed; BAD_INPUT (2) bad command line or manifest; NOT_PUBLISHED (3) nothing failed, but a checkpoint is
not published yet and not present.
"""
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List
from urllib.parse import urlparse

from hw3.common.errors import EXIT_USER_ERROR
from hw3.common.files import sha256_file
from hw3.common.manifest import Backbone, Checkpoint, load_manifest

# BAD_INPUT is run_cli's status for the ManifestError that download_all raises, and argparse's for bad arguments.
OK, FAILED, BAD_INPUT, NOT_PUBLISHED = 0, 1, EXIT_USER_ERROR, 3


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
        if sha256_file(dest) == checkpoint.sha256:
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
        actual = sha256_file(download)
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


def download_all(manifest: Path, dest_root: Path, skip_backbones: bool = False) -> int:
    """Every checkpoint of `manifest` under `dest_root`, then (unless skipped) every backbone; returns OK, FAILED or
    NOT_PUBLISHED. Raises ManifestError, before anything is fetched, when the manifest is unreadable or malformed."""
    checkpoints, backbones = load_manifest(manifest)
    dest_root = Path(dest_root)
    statuses = [fetch_checkpoint(checkpoint, dest_root) for checkpoint in checkpoints]
    if not skip_backbones:
        statuses += [preload_backbone(backbone) for backbone in backbones]
    status = overall_status(statuses)
    summary = {OK: "all done", FAILED: "FAILED (see the messages above)",
               NOT_PUBLISHED: "incomplete: a checkpoint is not published yet (see above)"}[status]
    print(f"hw3_download: {summary}; checkpoints under {dest_root.resolve()}")
    return status
