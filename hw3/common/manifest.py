"""checkpoints.json: the one list of trained checkpoints to fetch and pretrained backbones to pre-load.

    {"checkpoints": [{"name", "path" (relative to the destination root), "url", "sha256", "made_by",
                      "config" (the CaptionConfig fields that rebuild the model)}],
     "backbones":   [{"library": "clip" or "timm", "name"}]}

A published entry (one with a url) needs its sha256 and its config: the file itself holds only tensors (the course's
checkpoint format, hw3/p2/checkpoint.py), so the TA fetches one file and the entry says how to rebuild the model. A
checkpoint trained here keeps its config in a file beside it (`config_path`: best.pt -> best.config.json).
`checkpoint_path("p2_best")` is where `bash hw3_download.sh` puts a checkpoint: the default of every CLI that loads
the trained captioner. Reading the manifest happens when a path is needed, never at import time, so a malformed
checkpoints.json cannot break a script's `--help`.
"""
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import List, Optional, Tuple

from hw3.common.errors import UserError
from hw3.common.files import REPO_ROOT, read_json

MANIFEST = REPO_ROOT / "checkpoints.json"
BACKBONE_LIBRARIES = ("clip", "timm")
DEFAULT_CHECKPOINT = "p2_best"  # the captioner hw3_2.sh, P3 and the notebook load
CONFIG_SUFFIX = ".config.json"


@dataclass
class Checkpoint:
    name: str
    path: str  # relative to the destination root (the repo root by default)
    url: str = ""  # empty until published
    sha256: str = ""
    made_by: str = ""  # what produces it, for the "not published yet" message
    config: Optional[dict] = None  # CaptionConfig fields (checked in full when the model is built)


@dataclass
class Backbone:
    library: str  # "clip" or "timm"
    name: str


class ManifestError(UserError):
    pass


def parse_checkpoint(entry: dict) -> Checkpoint:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("path"), str):
        raise ManifestError(f"a checkpoint entry needs a 'name' and a 'path': {entry!r}")
    checkpoint = Checkpoint(entry["name"], entry["path"], entry.get("url") or "", (entry.get("sha256") or "").lower(),
                            entry.get("made_by") or "", entry.get("config"))
    path = PurePosixPath(checkpoint.path)
    if path.is_absolute() or ".." in path.parts or not path.name:
        raise ManifestError(f"{checkpoint.name}: path must be relative and stay inside the destination root: {path}")
    if checkpoint.url and not re.fullmatch(r"[0-9a-f]{64}", checkpoint.sha256):
        raise ManifestError(f"{checkpoint.name}: a published checkpoint needs its sha256 (64 hex digits), "
                            f"got {checkpoint.sha256!r}")
    if checkpoint.config is not None and not (isinstance(checkpoint.config, dict)
                                              and isinstance(checkpoint.config.get("encoder"), str)):
        raise ManifestError(f"{checkpoint.name}: 'config' must be the CaptionConfig object of the checkpoint (with "
                            f"its 'encoder'), as its .config.json beside the trained file holds it under "
                            f"'caption_config': got {checkpoint.config!r:.200}")
    if checkpoint.url and checkpoint.config is None:
        raise ManifestError(f"{checkpoint.name}: a published checkpoint needs its 'config' (the CaptionConfig that "
                            "rebuilds the model: the 'caption_config' of the .config.json beside the trained file)")
    return checkpoint


def parse_backbone(entry: dict) -> Backbone:
    if not isinstance(entry, dict) or entry.get("library") not in BACKBONE_LIBRARIES \
            or not isinstance(entry.get("name"), str):
        raise ManifestError(f"a backbone entry needs 'library' (one of {BACKBONE_LIBRARIES}) and 'name': {entry!r}")
    return Backbone(entry["library"], entry["name"])


def load_manifest(path: Path = MANIFEST) -> Tuple[List[Checkpoint], List[Backbone]]:
    try:
        data = read_json(path, "checkpoint manifest")
    except UserError as error:
        raise ManifestError(f"cannot read manifest {path}: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("checkpoints", []), list) \
            or not isinstance(data.get("backbones", []), list):
        raise ManifestError(f"{path}: expected an object with lists 'checkpoints' and 'backbones'")
    return ([parse_checkpoint(entry) for entry in data.get("checkpoints", [])],
            [parse_backbone(entry) for entry in data.get("backbones", [])])


def config_path(checkpoint) -> Path:
    """The config file beside a trained checkpoint (hw3/p2/checkpoint.py): its path without the extension, plus
    .config.json (runs/adapter/best.pt -> runs/adapter/best.config.json)."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + CONFIG_SUFFIX)


def checkpoint_entry(name: str = DEFAULT_CHECKPOINT, manifest: Path = MANIFEST) -> Checkpoint:
    checkpoints, _ = load_manifest(manifest)
    for checkpoint in checkpoints:
        if checkpoint.name == name:
            return checkpoint
    raise ManifestError(f"{manifest} has no checkpoint named {name!r}: {[c.name for c in checkpoints]}")


def checkpoint_path(name: str = DEFAULT_CHECKPOINT, manifest: Path = MANIFEST, dest_root: Path = REPO_ROOT) -> Path:
    """Where checkpoint `name` lives once hw3_download.sh has fetched it."""
    return dest_root / checkpoint_entry(name, manifest).path


def default_checkpoint_help() -> str:
    """For --checkpoint's help text: the default path, or why there is none (never raises)."""
    try:
        return f"default: {checkpoint_path()}, fetched by hw3_download.sh"
    except UserError as error:
        return f"no default: {error}"
