"""Trained checkpoints of the captioner: only the trainable tensors, in safetensors, with the CaptionConfig JSON in
the file's metadata (so a checkpoint rebuilds its own model). `load_captioner` is THE loader of a trained captioner:
hw3_2.sh, P3, the notebook and the benchmarks all go through it.

    model = load_captioner("checkpoints/p2_best.safetensors", "decoder_model.bin", device)

It rebuilds the model from the stored config (frozen encoder and GPT-2 from their own sources), loads the trained
tensors on top with strict=False, and verifies what arrived: every tensor in the file must fit a parameter, every
trainable parameter must get one (nothing trainable stays at its random init), and afterwards every parameter must
hold exactly the file's values.
"""
import hashlib
import os
from typing import Dict, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hw3.common.errors import UserError
from hw3.common.files import write_atomically
from hw3.p2.model import CaptionConfig, CaptionModel, build_caption_model, trainable_state_dict


class CheckpointError(UserError):
    pass


def save_trainable(model: CaptionModel, path: str, collapse_prefix: bool = True) -> int:
    """Writes only the trainable tensors (the CaptionConfig JSON in the metadata), whole or not at all; returns
    their parameter count. Creates the parent folder."""
    tensors = {name: t.contiguous().cpu() for name, t in trainable_state_dict(model, collapse_prefix).items()}
    write_atomically(path, lambda temporary: save_file(tensors, temporary,
                                                       metadata={"caption_config": model.config.to_json()}))
    return sum(t.numel() for t in tensors.values())


def read_checkpoint(path: str) -> Tuple[CaptionConfig, Dict[str, torch.Tensor]]:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:  # truncated or not a safetensors file
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    if "caption_config" not in metadata:
        raise CheckpointError(f"checkpoint {path} has no caption_config in its metadata")
    return CaptionConfig.from_json(metadata["caption_config"]), tensors


def tensors_sha256(path: str) -> str:
    """sha256 of a checkpoint's tensors (names, dtypes, shapes, values), not of its metadata: two runs that trained
    the same weights from data in other folders (the caption config names the encoder's path) get the same digest."""
    digest = hashlib.sha256()
    _, tensors = read_checkpoint(path)
    for key in sorted(tensors):
        tensor = tensors[key].contiguous()
        digest.update(f"{key}:{tensor.dtype}:{list(tensor.shape)}:".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def count_checkpoint_params(path: str) -> int:
    with safe_open(path, framework="pt") as f:
        return sum(torch.Size(f.get_slice(key).get_shape()).numel() for key in f.keys())


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


def load_captioner(checkpoint: str, decoder_weights: str, device="cpu", encoder: Optional[str] = None) -> CaptionModel:
    """The trained captioner of `checkpoint` in eval mode on `device` (see the module docstring). `encoder`
    overrides the image encoder named in the checkpoint's config (e.g. the toy world's clip.pt)."""
    if not os.path.isfile(checkpoint):
        raise CheckpointError(f"checkpoint not found: {checkpoint} (run `bash hw3_download.sh` to fetch the "
                              "published one, or pass --checkpoint PATH)")
    if not os.path.isfile(decoder_weights):
        raise CheckpointError(f"decoder weights not found: {decoder_weights} (the course's decoder_model.bin)")
    config, tensors = read_checkpoint(checkpoint)
    model = build_caption_model(config, decoder_weights, device, encoder=encoder)
    load_trainable(model, tensors, source=checkpoint)
    model.eval()
    verify_loaded(model, tensors, checkpoint)
    return model
