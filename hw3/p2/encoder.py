"""Frozen ViT image encoders behind one interface: images [B, 3, H, W] -> tokens [B, N, D] (float32).

Names (`load_image_encoder(name)`):
- an OpenAI CLIP ViT of the `clip` package: "ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px". Tokens: every
  token of the last layer (CLS first, then the patches row by row) after `ln_post`, without the projection.
- "timm:<model name>", e.g. "timm:vit_large_patch14_clip_quickgelu_224.openai": `forward_features` (final norm
  applied, all tokens). Mind the tags: in timm 0.9.10 a bare name loads timm's default tag (for
  `vit_large_patch14_clip_224` that is LAION weights, not OpenAI's), and the OpenAI CLIP weights used QuickGELU,
  which only the `_quickgelu_` variants reproduce.
- the path of a state_dict in OpenAI CLIP's layout (e.g. the toy world's `clip.pt`), loaded by
  hw3.common.clip_models.load_clip.

`layer` picks which block's output the tokens come from, Python-style: -1 the last block (default), -2 the one before
(its patch tokens are more local: the last block's patch outputs feed nothing in CLIP's training loss), 0 the first.
The backbone's final norm is applied to whichever block is chosen.

Metadata for cross-attention maps (P3): `grid` (h, w) of patches, `n_prefix_tokens` leading non-patch tokens
(CLS, ...), so patch tokens are `tokens[:, n_prefix_tokens:]` reshaped to grid; `width` D; `image_size`;
`preprocess` (PIL image -> normalised tensor, the backbone's own resize/crop/normalisation).
"""
import warnings
from typing import Callable, Tuple

import clip
import torch
import torch.nn as nn
from clip.model import VisionTransformer
from torchvision import transforms

from hw3.common.clip_models import clip_transform, is_local_checkpoint, load_clip
from hw3.common.errors import UserError

# name: (image_size, patch_size, width, layers) of the OpenAI CLIP ViTs, to build them with random weights (tests)
CLIP_VITS = {"ViT-B/32": (224, 32, 768, 12), "ViT-B/16": (224, 16, 768, 12), "ViT-L/14": (224, 14, 1024, 24),
             "ViT-L/14@336px": (336, 14, 1024, 24)}


def blocks_up_to(blocks: nn.Sequential, layer: int) -> nn.Sequential:
    """The first blocks of `blocks`, up to and including index `layer` (Python-style, -1: all)."""
    if not -len(blocks) <= layer < len(blocks):
        raise UserError(f"encoder layer {layer} out of range for {len(blocks)} blocks (model.encoder_layer: "
                        f"-{len(blocks)} to {len(blocks) - 1})")
    return blocks[:layer % len(blocks) + 1]


def clip_vit_tokens(visual: VisionTransformer, images: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """CLIP's VisionTransformer.forward, keeping every token of block `layer`: [B, 1 + h*w, width], ln_post applied,
    no projection."""
    x = visual.conv1(images.to(visual.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # [B, h*w, width]
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype))
    x = blocks_up_to(visual.transformer.resblocks, layer)(x.permute(1, 0, 2)).permute(1, 0, 2)  # blocks take [L, B, D]
    return visual.ln_post(x)


class ImageEncoder(nn.Module):
    """A frozen backbone (no gradients, always in eval mode) with the metadata described in the module docstring."""

    def __init__(self, name: str, backbone: nn.Module, preprocess: Callable, grid: Tuple[int, int],
                 n_prefix_tokens: int, width: int, image_size: int, layer: int = -1):
        super().__init__()
        self.name, self.backbone, self.preprocess, self.layer = name, backbone, preprocess, layer
        self.grid, self.n_prefix_tokens, self.width, self.image_size = tuple(grid), n_prefix_tokens, width, image_size
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    @property
    def n_tokens(self) -> int:
        return self.n_prefix_tokens + self.grid[0] * self.grid[1]

    def train(self, mode: bool = True) -> "ImageEncoder":
        return super().train(False)  # frozen: dropout / norm statistics stay in inference mode

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if isinstance(self.backbone, VisionTransformer):
            tokens = clip_vit_tokens(self.backbone, images, self.layer)
        else:
            tokens = timm_vit_tokens(self.backbone, images, self.layer)
        return tokens.float()


def timm_vit_tokens(model: nn.Module, images: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """timm's VisionTransformer.forward_features, stopping after block `layer`."""
    x = images.to(next(model.parameters()).dtype)
    if layer == -1:
        return model.forward_features(x)
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    return model.norm(blocks_up_to(model.blocks, layer)(x))


def load_image_encoder(name: str, device="cpu", pretrained: bool = True, layer: int = -1) -> ImageEncoder:
    """The encoder called `name` (see the module docstring), its tokens taken from block `layer`. pretrained=False
    builds the same architecture with random weights (tests; nothing is downloaded); a local file always loads its
    weights."""
    if name.startswith("timm:"):
        return _timm_encoder(name, device, pretrained, layer)
    if name in CLIP_VITS and not pretrained:
        image_size, patch_size, width, layers = CLIP_VITS[name]
        visual = VisionTransformer(image_size, patch_size, width, layers, heads=width // 64, output_dim=768)
        preprocess = clip_transform(image_size)
    elif name in clip.available_models() or is_local_checkpoint(name):
        model, preprocess = load_clip(name, device)
        visual = model.visual
        if not isinstance(visual, VisionTransformer):
            raise UserError(f"{name} is a CLIP ResNet; only ViT encoders give patch tokens here")
    else:
        raise UserError(f"unknown image encoder {name!r}: use one of {list(CLIP_VITS)}, 'timm:<model name>', "
                        "or the path of a CLIP state_dict")
    blocks_up_to(visual.transformer.resblocks, layer)  # checks the range
    patch_size = visual.conv1.kernel_size[0]
    side = visual.input_resolution // patch_size
    return ImageEncoder(name, visual.to(device), preprocess, (side, side), 1, visual.conv1.out_channels,
                        visual.input_resolution, layer)


def _timm_encoder(name: str, device, pretrained: bool, layer: int) -> ImageEncoder:
    import timm  # imported here: only timm encoders need it
    from timm.data import create_transform, resolve_data_config

    model_name = name[len("timm:"):]
    model = timm.create_model(model_name, pretrained=pretrained, num_classes=0)
    tag = model.pretrained_cfg.get("tag") or ""
    if "." not in model_name:
        warnings.warn(f"{name}: no pretrained tag given, timm uses its default {tag!r}")
    if tag.startswith("openai") and "quickgelu" not in model_name and "_clip_" in model_name:
        warnings.warn(f"{name}: OpenAI CLIP weights were trained with QuickGELU; this variant uses GELU "
                      f"(use the '_clip_quickgelu_' model of the same size to reproduce CLIP)")
    data_config = resolve_data_config({}, model=model)
    if tag.startswith("openai"):
        data_config["crop_pct"] = 1.0  # CLIP's own preprocessing: resize the short side to the crop size
    preprocess = transforms.Compose([lambda image: image.convert("RGB"), create_transform(**data_config)])
    image_size = data_config["input_size"][-1]
    blocks_up_to(model.blocks, layer)  # checks the range
    return ImageEncoder(name, model.to(device), preprocess, model.patch_embed.grid_size, model.num_prefix_tokens,
                        model.num_features, image_size, layer)
