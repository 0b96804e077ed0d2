"""Loading OpenAI CLIP models by name (real weights) or from a local state_dict file (e.g. the toy world's CLIP).

`clip.load(path)` cannot read a plain state_dict under torch 1.12 (it tries `torch.jit.load` first, which consumes
the file handle, then re-reads the exhausted handle), so local files go through `clip.model.build_model` here.
"""
import os
from typing import Callable, Tuple

import clip
import torch
from clip.model import CLIP, build_model
from PIL import Image
from torchvision import transforms

from hw3.common.errors import UserError
from hw3.common.files import load_state_dict_file

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_resize_crop(image_size: int) -> transforms.Compose:
    """The geometric part of CLIP's preprocessing: bicubic resize of the short side, then a centre crop."""
    return transforms.Compose([
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
    ])


def clip_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """CLIP's own preprocessing: `clip_resize_crop`, RGB, normalise."""
    return transforms.Compose(clip_resize_crop(image_size).transforms + [
        lambda image: image.convert("RGB"),
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def is_local_checkpoint(name_or_path: str) -> bool:
    return os.path.sep in name_or_path or name_or_path.endswith((".pt", ".pth", ".bin"))


def load_clip(name_or_path: str, device="cpu") -> Tuple[CLIP, Callable[[Image.Image], torch.Tensor]]:
    """Returns (model in eval mode, image preprocess). fp32 on CPU; fp16 weights on CUDA, as `clip.load` does.

    `name_or_path` is a `clip.available_models()` name (downloaded to ~/.cache/clip by hw3_download.sh) or the path
    of a state_dict in OpenAI CLIP's layout.
    """
    device = torch.device(device)
    if name_or_path in clip.available_models():  # checked first: "ViT-B/32" contains a path separator
        model, _ = clip.load(name_or_path, device=device, jit=False)
    elif is_local_checkpoint(name_or_path):
        state_dict = load_state_dict_file(name_or_path, "a CLIP state_dict in OpenAI CLIP's layout")
        if "visual.conv1.weight" not in state_dict:
            raise UserError(f"{name_or_path} is not a state_dict in OpenAI CLIP's layout (no visual.conv1.weight)")
        model = build_model(state_dict).to(device)  # build_model casts to fp16, like the released weights
    else:
        raise UserError(f"unknown CLIP model {name_or_path!r}: use one of {clip.available_models()} or a file path")
    if device.type == "cpu":
        model = model.float()
    return model.eval(), clip_transform(model.visual.input_resolution)


def encode_text_trimmed(model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """`model.encode_text(tokens)` (tokens [B, context], padded with 0) computed only up to the longest caption's end
    token. The text tower's causal mask keeps each caption's end-token feature blind to the padding after it, so the
    features are those of encode_text (to float rounding; a test compares them) for a fraction of the cost. The
    blocks run here with the top-left corner of their causal mask; the model is not changed."""
    length = int(tokens.argmax(dim=-1).max()) + 1  # the end token has the largest id, as encode_text assumes
    tokens = tokens[:, :length]
    x = model.token_embedding(tokens).type(model.dtype) + model.positional_embedding[:length].type(model.dtype)
    x = x.permute(1, 0, 2)  # [length, B, width], as CLIP's blocks take it
    for block in model.transformer.resblocks:
        mask = block.attn_mask[:length, :length].to(dtype=x.dtype, device=x.device)
        h = block.ln_1(x)
        x = x + block.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        x = x + block.mlp(block.ln_2(x))
    x = model.ln_final(x.permute(1, 0, 2)).type(model.dtype)
    return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ model.text_projection
