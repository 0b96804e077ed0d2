"""Trained checkpoints of the captioner, in the course's format: `torch.save` of a plain dict {trainable parameter
name: tensor} (contiguous, on the CPU) and nothing else, so the course's parameter count (`torch.load(path,
map_location="cpu")` and the sum of the tensors' numel()) reads the file as it is. The CaptionConfig that rebuilds
the model travels beside the file:

    runs/adapter/best.pt            {name: tensor}: the trainable tensors only
    runs/adapter/best.config.json   {"caption_config": {the CaptionConfig fields}}

(`config_path`: the checkpoint's path without its extension, plus .config.json). The published checkpoint
(checkpoints.json's "p2_best", fetched by hw3_download.sh) needs no such file: its checkpoints.json entry holds the
config, so the TA downloads one file.

`load_captioner` is THE loader of a trained captioner: hw3_2.sh, P3, the notebook and the benchmarks all go through it.

    model = load_captioner(None, "decoder_model.bin", device)                  # the published checkpoint
    model = load_captioner("runs/adapter/best.pt", "decoder_model.bin", device)  # your own file

It rebuilds the model from the config (frozen encoder and GPT-2 from their own sources), loads the trained tensors
on top with strict=False, and verifies what arrived: every tensor in the file must fit a parameter, every trainable
parameter must get one (nothing trainable stays at its random init), and afterwards every parameter must hold exactly
the file's values.

Loading a checkpoint unpickles it, which can run code: safe for the student's own file only. So the default
checkpoint (no path given) loads only when its sha256 is the one checkpoints.json publishes (`published_checkpoint`,
the one gate of every default-checkpoint user); a path given explicitly is the user's own file and loads as given.
"""
import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from hw3.common.errors import UserError
from hw3.common.files import (REPO_ROOT, load_state_dict_file, read_json, save_torch, sha256_file, text_writer,
                              write_together)
from hw3.common.manifest import (DEFAULT_CHECKPOINT, MANIFEST, ManifestError, checkpoint_entry, config_path,
                                 load_manifest)
from hw3.p2.model import CaptionConfig, CaptionModel, build_caption_model, trainable_state_dict

CONFIG_KEY = "caption_config"  # the one key of a checkpoint's .config.json
CHECKPOINT_FORMAT = "a captioner checkpoint (torch.save of {trainable parameter name: tensor})"
Writes = List[Tuple[Path, Callable[[str], None]]]  # (target, write) for hw3.common.files.write_together


class CheckpointError(UserError):
    pass


# ---- writing ------------------------------------------------------------------------------------------------------

def checkpoint_tensors(model: CaptionModel, collapse_prefix: bool = True) -> Dict[str, torch.Tensor]:
    """What a checkpoint file holds: trainable_state_dict's tensors, each a contiguous CPU copy of its own (torch.save
    writes a tensor's whole storage, so no tensor may be a view into a larger one)."""
    return {name: t.detach().to("cpu", copy=True).contiguous()
            for name, t in trainable_state_dict(model, collapse_prefix).items()}


def checkpoint_writes(tensors: Dict[str, torch.Tensor], config: CaptionConfig, path) -> Writes:
    """The two files of a checkpoint at `path`, the tensors and their config, as (target, write) pairs."""
    sidecar = json.dumps({CONFIG_KEY: asdict(config)}, indent=1, sort_keys=True) + "\n"
    return [(Path(path), lambda temporary: save_torch(tensors, temporary)),
            (config_path(path), text_writer(sidecar))]


def save_trainable(model: CaptionModel, path: str, collapse_prefix: bool = True) -> int:
    """Writes the trainable tensors to `path` and their config beside it, both or neither; returns their parameter
    count. Creates the parent folder."""
    tensors = checkpoint_tensors(model, collapse_prefix)
    write_together(checkpoint_writes(tensors, model.config, path))
    return sum(t.numel() for t in tensors.values())


# ---- reading ------------------------------------------------------------------------------------------------------

def read_tensors(path) -> Dict[str, torch.Tensor]:
    """The checkpoint's tensors (torch.load on the CPU). A missing file, or one that is not a dict of tensors (an
    HTML page, a cut-off download, a file in another format), raises CheckpointError naming it, in one line."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return load_state_dict_file(path, CHECKPOINT_FORMAT)
    except UserError as error:
        raise CheckpointError(" ".join(str(error).split())) from None


def caption_config(values, source: str) -> CaptionConfig:
    """A CaptionConfig from its fields (a checkpoint's .config.json or checkpoints.json entry, named by `source`)."""
    if not isinstance(values, dict):
        raise CheckpointError(f"{source}: expected the CaptionConfig fields as an object, got {values!r:.200}")
    try:
        return CaptionConfig.from_dict(values)
    except (UserError, TypeError) as error:
        raise CheckpointError(f"{source}: not a CaptionConfig of this code ({error})") from None


def read_sidecar(checkpoint) -> Optional[CaptionConfig]:
    """The config in the .config.json beside `checkpoint`, or None when there is no such file."""
    sidecar = config_path(checkpoint)
    if not sidecar.is_file():
        return None
    data = read_json(sidecar, "checkpoint config")
    if not isinstance(data, dict) or CONFIG_KEY not in data:
        raise CheckpointError(f"{sidecar} has no {CONFIG_KEY!r}: expected {{{CONFIG_KEY!r}: {{CaptionConfig "
                              "fields}}}, as p2_train.py writes it beside each checkpoint")
    return caption_config(data[CONFIG_KEY], str(sidecar))


def manifest_config(checkpoint) -> Optional[CaptionConfig]:
    """The config of the checkpoints.json entry whose file is `checkpoint`, or None (no such entry, no config, an
    unreadable manifest)."""
    manifest, dest_root = MANIFEST, REPO_ROOT  # looked up per call, so a test can point them elsewhere
    try:
        entries = load_manifest(manifest)[0]
    except ManifestError:
        return None
    for entry in entries:
        if entry.config is not None and os.path.abspath(dest_root / entry.path) == os.path.abspath(checkpoint):
            return caption_config(entry.config, f"{manifest} ({entry.name}'s config)")
    return None


def checkpoint_config(checkpoint) -> CaptionConfig:
    """The CaptionConfig of `checkpoint`: its .config.json beside it; for a file where checkpoints.json puts one of
    its checkpoints, that entry's config; else CheckpointError naming what is missing."""
    config = read_sidecar(checkpoint) or manifest_config(checkpoint)
    if config is None:
        raise CheckpointError(f"no config for checkpoint {checkpoint}: {config_path(checkpoint)} is missing (the "
                              "CaptionConfig that p2_train.py writes beside each checkpoint: keep the two files "
                              "together), and no checkpoints.json entry with a 'config' names this file")
    return config


def read_checkpoint(path) -> Tuple[CaptionConfig, Dict[str, torch.Tensor]]:
    return checkpoint_config(path), read_tensors(path)


def published_checkpoint() -> Tuple[str, CaptionConfig]:
    """The default checkpoint (checkpoints.json's p2_best, where hw3_download.sh puts it) and its entry's config,
    once its sha256 is the published one (before anything unpickles it). Raises CheckpointError when the file is
    missing, not published, or another file."""
    manifest, dest_root = MANIFEST, REPO_ROOT  # looked up per call, so a test can point them elsewhere
    entry = checkpoint_entry(DEFAULT_CHECKPOINT, manifest)
    path = dest_root / entry.path
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (run `bash hw3_download.sh` to fetch the published one, "
                              "or pass --checkpoint PATH)")
    if not entry.sha256:
        raise CheckpointError(f"{path} cannot be verified: checkpoints.json publishes no sha256 for "
                              f"{DEFAULT_CHECKPOINT} yet; pass --checkpoint {path} to load it as your own file")
    if sha256_file(path) != entry.sha256:
        raise CheckpointError(f"{path} does not match the sha256 published in checkpoints.json: run `bash "
                              "hw3_download.sh` to fetch the published file (or pass --checkpoint PATH to load your "
                              "own file)")
    if entry.config is None:
        raise CheckpointError(f"checkpoints.json's {DEFAULT_CHECKPOINT} entry has no 'config' (the CaptionConfig "
                              "that rebuilds the model)")
    return str(path), caption_config(entry.config, f"{manifest} ({DEFAULT_CHECKPOINT}'s config)")


# ---- digests and counts -------------------------------------------------------------------------------------------

def tensors_sha256(path) -> str:
    """sha256 of a checkpoint's tensors (names, dtypes, shapes, values), not of its config: two runs that trained
    the same weights from data in other folders (the caption config names the encoder's path) get the same digest."""
    digest = hashlib.sha256()
    tensors = read_tensors(path)
    for key in sorted(tensors):
        tensor = tensors[key].contiguous()
        digest.update(f"{key}:{tensor.dtype}:{list(tensor.shape)}:".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def count_checkpoint_params(path) -> int:
    """The course's count: torch.load(path, map_location="cpu"), then the sum of its tensors' numel()."""
    return sum(t.numel() for t in read_tensors(path).values())


def publication_entry(checkpoint: str, made_by: str) -> dict:
    """The checkpoints.json entry that publishes `checkpoint` (a run's best.pt) as p2_best, once uploaded and its
    url filled in: the path hw3_download.sh puts it at, the file's sha256, and the config beside it."""
    config = read_sidecar(checkpoint)
    if config is None:
        raise CheckpointError(f"cannot publish {checkpoint}: {config_path(checkpoint)} (its config) is missing")
    read_tensors(checkpoint)  # only a file that loads is published
    return {"name": DEFAULT_CHECKPOINT, "path": checkpoint_entry(DEFAULT_CHECKPOINT, MANIFEST).path, "url": "",
            "sha256": sha256_file(checkpoint), "made_by": made_by, "config": asdict(config)}


# ---- loading into a model -----------------------------------------------------------------------------------------

def load_trainable(model: CaptionModel, tensors: Dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Loads trained tensors into `model` in place (strict=False on top of the pretrained weights) after checking
    that every tensor fits a parameter and every trainable parameter gets one; all problems are reported at once.
    Collapses the model's prefix MLP when the tensors hold collapsed
    prefixes (build the optimizer after loading)."""
    if model.prefix is not None and "prefix.prefixes" in tensors:
        model.prefix.collapse()
    own = dict(model.named_parameters())
    unexpected = sorted(set(tensors) - set(own))
    missing = sorted(name for name, p in own.items() if p.requires_grad and name not in tensors)
    wrong = sorted(f"{key} {list(t.shape)} vs {list(own[key].shape)}" for key, t in tensors.items()
                   if key in own and t.shape != own[key].shape)
    problems = [f"{source} {problem}: {keys}" for problem, keys in (
        ("has unknown tensors", unexpected), ("lacks trained tensors", missing),
        ("has tensors of the wrong shape (file vs model)", wrong)) if keys]
    if problems:  # all of them at once: a renamed key shows up as one unknown and one missing tensor
        raise CheckpointError("\n".join(problems))
    model.load_state_dict(tensors, strict=False)


def verify_loaded(model: CaptionModel, tensors: Dict[str, torch.Tensor], source: str) -> None:
    """Raises CheckpointError unless every parameter named in `tensors` holds exactly their values."""
    own = dict(model.named_parameters())
    differ = sorted(key for key, tensor in tensors.items() if not torch.equal(own[key].detach().cpu(), tensor))
    if differ:
        raise CheckpointError(f"{source}: these tensors did not arrive in the model: {differ}")


def load_captioner(checkpoint: Optional[str], decoder_weights: str, device="cpu",
                   encoder: Optional[str] = None) -> CaptionModel:
    """The trained captioner of `checkpoint` in eval mode on `device` (see the module docstring); None: the
    published default, sha256-verified first (published_checkpoint). `encoder` overrides the image encoder named in
    the config (e.g. the toy world's clip.pt)."""
    config = None
    if checkpoint is None:
        checkpoint, config = published_checkpoint()
    elif not os.path.isfile(checkpoint):
        raise CheckpointError(f"checkpoint not found: {checkpoint} (run `bash hw3_download.sh` to fetch the "
                              "published one, or pass --checkpoint PATH)")
    if not os.path.isfile(decoder_weights):
        raise CheckpointError(f"decoder weights not found: {decoder_weights} (the course's decoder_model.bin)")
    tensors = read_tensors(checkpoint)
    config = config or checkpoint_config(checkpoint)
    model = build_caption_model(config, decoder_weights, device, encoder=encoder)
    load_trainable(model, tensors, source=checkpoint)
    model.eval()
    verify_loaded(model, tensors, checkpoint)
    return model
