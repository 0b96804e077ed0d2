"""Fetches the trained checkpoints and pre-loads the pretrained backbones that checkpoints.json lists
(hw3/common/manifest.py): what `bash hw3_download.sh` runs.

A checkpoint is fetched with `wget -O` (`gdown --fuzzy URL -O` for Google Drive links) into a private temporary
folder beside its destination, its sha256 is checked, and only then is it renamed into place (one atomic rename), so
an interrupted or corrupt download never leaves a file at the destination. A file already there with the right sha256
is kept and nothing is requested; one with another sha256 is replaced by the published file and kept as `<path>.old`.
An entry whose url is still empty has not been published yet: it is reported, and is fine only if the file is
already there (trained locally). Publishing one: upload the file, then fill in its url and `sha256sum` in the manifest.

Backbones are loaded once so that their weights sit in the usual caches (~/.cache/clip for OpenAI CLIP,
~/.cache/huggingface/hub for timm) before the graded scripts run: the manifest's list (the CLIP models P1 and the scorer
use), then the image encoder that each present checkpoint's config names (CaptionConfig.encoder: its checkpoints.json
entry's "config", or for a checkpoint trained here the .config.json beside it), and nothing else. They come after the
checkpoints, and every item is attempted even when an earlier one failed.

timm weights (`timm_weights_file`): the file that timm's pretrained config names (hub id + file name, timm 0.9.10's
broken ids fixed: `timm_weights_source`), fetched with huggingface_hub into its cache, where hw3/p2/encoder.py finds
it again without touching the network (`cached_timm_weights`): after hw3_download.sh, hw3_2.sh runs offline.

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
from typing import Callable, List, Optional, Tuple
from urllib.parse import urlparse

from hw3.common.encoder_names import parse_encoder_name, timm_encoder
from hw3.common.errors import EXIT_USER_ERROR, UserError
from hw3.common.files import read_json, sha256_file
from hw3.common.manifest import Backbone, Checkpoint, config_path, load_manifest

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


# ---- timm weights: where they are published, and the Hugging Face cache ------------------------------------------

TIMM_WEIGHTS_NAME = "pytorch_model.bin"  # the file timm 0.9.10 fetches when a config names none (HF_WEIGHTS_NAME)


def timm_weights_source(model_name: str) -> Tuple[str, str]:
    """(hub id, file name) under which the weights of timm model `model_name` ("architecture.tag"; no tag: timm's
    default one) are published, from timm's pretrained config, with one fix: timm 0.9.10 completes the hub id
    "timm/" of the `_clip_quickgelu_` copies of its configs with the quickgelu name (e.g.
    timm/vit_large_patch14_clip_quickgelu_224.openai), a repository that does not exist. The weights are published
    under the plain name: timm 0.9.11 names timm/vit_large_patch14_clip_224.openai explicitly, and so does open_clip.
    Raises UserError for a name timm has no Hugging Face weights for."""
    import timm.models  # only timm encoders need it
    try:
        config = timm.models.get_pretrained_cfg(model_name)
    except RuntimeError as error:  # a known architecture with an unknown tag
        raise UserError(f"timm {timm.__version__}: {error}") from None
    if config is None or not config.hf_hub_id:
        raise UserError(f"timm {timm.__version__} has no Hugging Face weights for {model_name!r} "
                        "(see timm.list_pretrained())")
    architecture = timm_encoder(model_name).model
    full_name = f"{architecture}.{config.tag}" if config.tag else architecture
    hub_id = config.hf_hub_id
    if "_clip_quickgelu_" in full_name and hub_id == "timm/" + full_name:
        hub_id = "timm/" + full_name.replace("_clip_quickgelu_", "_clip_")
    return hub_id, config.hf_hub_filename or TIMM_WEIGHTS_NAME


def timm_weights_candidates(filename: str) -> List[str]:
    """The files timm tries, in its order: the safetensors alternatives of `filename` first, then `filename`."""
    from timm.models._hub import _get_safe_alternatives  # timm 0.9.10's own rule (load_state_dict_from_hf)
    return list(_get_safe_alternatives(filename)) + [filename]


def cached_timm_weights(model_name: str) -> Optional[str]:
    """The path of `model_name`'s weights file in the Hugging Face cache ($HF_HUB_CACHE, or $HF_HOME/hub, default
    ~/.cache/huggingface/hub), or None when it is not there. Reads the cache only: no network."""
    from huggingface_hub import try_to_load_from_cache
    hub_id, filename = timm_weights_source(model_name)
    for candidate in timm_weights_candidates(filename):
        path = try_to_load_from_cache(hub_id, candidate)  # a path, None, or a "known not to exist" marker
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def timm_weights_file(model_name: str) -> str:
    """The local path of `model_name`'s weights: from the Hugging Face cache when they are there (no network at
    all), else downloaded into it (safetensors alternative first, as timm does). Raises UserError naming the hub
    id when they are neither cached nor downloadable."""
    cached = cached_timm_weights(model_name)
    if cached:
        return cached
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError
    hub_id, filename = timm_weights_source(model_name)
    *alternatives, filename = timm_weights_candidates(filename)
    try:
        for alternative in alternatives:
            try:
                return hf_hub_download(hub_id, alternative)
            except EntryNotFoundError:  # not published in that format (or offline): try the next file
                pass
        return hf_hub_download(hub_id, filename)
    except Exception as error:  # offline, hub unreachable, repository or file missing
        from huggingface_hub.constants import HF_HUB_CACHE
        raise UserError(f"{timm_encoder(model_name)}: its weights (https://huggingface.co/{hub_id}, {filename}) are "
                        f"not in the Hugging Face cache {HF_HUB_CACHE} and cannot be downloaded "
                        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); run "
                        "`bash hw3_download.sh` where there is network") from error


# ---- backbones --------------------------------------------------------------------------------------------------

def checkpoint_encoder(checkpoint: Checkpoint, path: Path) -> Optional[str]:
    """The image encoder (CaptionConfig.encoder) of the checkpoint at `path`: from its manifest entry's config, else
    (a checkpoint trained here, not published) from the .config.json beside the file; None when neither names one."""
    config = checkpoint.config
    if config is None:
        try:
            config = read_json(config_path(path), "checkpoint config").get("caption_config")
        except (UserError, AttributeError):  # no config file, malformed JSON, not an object
            return None
    encoder = config.get("encoder") if isinstance(config, dict) else None
    return encoder if isinstance(encoder, str) else None


def encoder_backbone(encoder: str) -> Optional[Backbone]:
    """The backbone to pre-load for a P2 encoder name: a CLIP name or "timm:<model>"; None for a local file (the toy
    world's CLIP, "timm:<model>@<file>"), which needs no download."""
    name = parse_encoder_name(encoder)
    if name.kind == "clip":
        return Backbone("clip", name.model)
    if name.kind == "timm" and not name.file:
        return Backbone("timm", name.timm_model)
    return None


def preload_backbone(backbone: Backbone, verify: Optional[Callable[[str], object]] = None) -> int:
    """Loads the pretrained weights once so they are cached; returns OK or FAILED. timm weights are fetched into the
    Hugging Face cache (timm_weights_file), then `verify("timm:<name>")` (hw3_download.py passes the P2 encoder
    loader) loads them from there, offline, as hw3_2.sh will."""
    label = f"{backbone.library} {backbone.name}"
    print(f"backbone {label}: loading (downloads into its cache on the first run)", flush=True)
    try:
        if backbone.library == "clip":
            import clip
            if backbone.name not in clip.available_models():
                raise ValueError(f"unknown CLIP model; available: {clip.available_models()}")
            clip.load(backbone.name, device="cpu", jit=False)
        else:
            path = timm_weights_file(backbone.name)
            print(f"backbone {label}: weights file {path}", flush=True)
            if verify is not None:
                verify(timm_encoder(backbone.name).text)
    except Exception as error:  # a broken backbone must not hide the others, so report it and go on
        print(f"backbone {label}: FAILED: {type(error).__name__}: {error}", file=sys.stderr)
        return FAILED
    print(f"backbone {label}: cached")
    return OK


def overall_status(statuses: List[int]) -> int:
    if FAILED in statuses:
        return FAILED
    return NOT_PUBLISHED if NOT_PUBLISHED in statuses else OK


def backbones_to_preload(backbones: List[Backbone], checkpoints: List[Checkpoint], dest_root: Path) -> List[Backbone]:
    """The manifest's backbones, then the encoder named in each checkpoint present under `dest_root` (each once)."""
    wanted = list(backbones)
    for checkpoint in checkpoints:
        path = dest_root / checkpoint.path
        if not path.is_file():
            continue
        encoder = checkpoint_encoder(checkpoint, path)
        if encoder is None:
            print(f"{checkpoint.name}: no config names its image encoder (neither its checkpoints.json entry nor "
                  f"{config_path(path).name} beside {path}); none pre-loaded for it", file=sys.stderr)
            continue
        backbone = encoder_backbone(encoder)
        if backbone is None:
            print(f"{checkpoint.name}: its encoder {encoder} is a local file; nothing to download")
        elif (backbone.library, backbone.name) not in {(b.library, b.name) for b in wanted}:
            print(f"{checkpoint.name}: its image encoder is {backbone.library} {backbone.name}")
            wanted.append(backbone)
    return wanted


def download_all(manifest: Path, dest_root: Path, skip_backbones: bool = False,
                 verify_encoder: Optional[Callable[[str], object]] = None) -> int:
    """Every checkpoint of `manifest` under `dest_root`, then (unless skipped) the manifest's backbones and the image
    encoder each checkpoint names; returns OK, FAILED or NOT_PUBLISHED. `verify_encoder`: loads a timm encoder by
    its P2 name after its weights are fetched. Raises ManifestError, before anything is fetched, when the manifest
    is unreadable or malformed."""
    checkpoints, backbones = load_manifest(manifest)
    dest_root = Path(dest_root)
    statuses = [fetch_checkpoint(checkpoint, dest_root) for checkpoint in checkpoints]
    if not skip_backbones:
        statuses += [preload_backbone(backbone, verify_encoder)
                     for backbone in backbones_to_preload(backbones, checkpoints, dest_root)]
    status = overall_status(statuses)
    summary = {OK: "all done", FAILED: "FAILED (see the messages above)",
               NOT_PUBLISHED: "incomplete: a checkpoint is not published yet (see above)"}[status]
    print(f"hw3_download: {summary}; checkpoints under {dest_root.resolve()}")
    return status
