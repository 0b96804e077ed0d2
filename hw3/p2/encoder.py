"""Frozen ViT image encoders behind one interface: images [B, 3, H, W] -> tokens [B, N, D] (float32).

Names (`load_image_encoder(name)`):
- an OpenAI CLIP ViT of the `clip` package: "ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px". Tokens: every
  token of the last layer (CLS first, then the patches row by row) after `ln_post`, without the projection.
- "timm:<model name>.<tag>", e.g. "timm:vit_huge_patch14_clip_quickgelu_378.dfn5b": `forward_features` (final norm
  applied, all tokens: CLS first where the model has one, then the patches; SigLIP has no CLS, its attention-pool
  head is not used). The weights: the file timm's pretrained config names (hub id and file as
  hw3.common.download.timm_weights_source gives them, timm 0.9.10's broken quickgelu ids fixed), taken from the
  Hugging Face cache when there (no network: what hw3_download.sh fills), downloaded otherwise, converted by timm's
  own checkpoint filter and loaded strictly (only the unused projection head is left out). Mind the tags: a bare
  name gets timm's default tag (for `vit_large_patch14_clip_224` that is LAION weights, not OpenAI's), and weights
  trained with QuickGELU (OpenAI, DFN, MetaCLIP: timm's note "natively QuickGELU") need the `_clip_quickgelu_`
  variant; the plain `_clip_` one computes GELU on them (a warning says so).
- "timm:<model name>.<tag>@<file>": that architecture with the weights of a local file in any layout timm's
  checkpoint filter reads (timm, open_clip, OpenAI CLIP); the file is everything after the first "@", so a path may
  hold "@" and "." (hw3.common.encoder_names, the one parser of these names). For an OpenAI CLIP state_dict, the
  sizes (image size, patch, width, depth, heads as width // 64, MLP ratio) come from the file, as
  clip.model.build_model infers them:
  "timm:vit_base_patch16_clip_quickgelu_224.openai@/path/clip.pt" is the toy world's tiny CLIP through timm.
- the path of a state_dict in OpenAI CLIP's layout (e.g. the toy world's `clip.pt`), loaded by
  hw3.common.clip_models.load_clip.

Preprocessing of timm encoders (PIL image from hw3.common.images.open_image -> tensor): size, mean/std and
interpolation from the pretrained config; the resize mode from the weights' publisher where timm's config differs
(RESIZE_MODES: open_clip's pretrained table squashes the whole image to the input size for SigLIP and DFN5B, and
resizes the short side and centre-crops for OpenAI CLIP).

`layer` picks which block's output the tokens come from, Python-style: -1 the last block (default), -2 the one before
(its patch tokens are more local: the last block's patch outputs feed nothing in CLIP's training loss), 0 the first.
The backbone's final norm is applied to whichever block is chosen (a timm backbone keeps only the blocks it runs).

Metadata for cross-attention maps (P3): `grid` (h, w) of patches, `n_prefix_tokens` leading non-patch tokens
(CLS, ...; 0 for SigLIP), so patch tokens are `tokens[:, n_prefix_tokens:]` reshaped to grid; `width` D;
`image_size`; `preprocess` (PIL image -> normalised tensor, the backbone's own resize/crop/normalisation).
"""
import sys
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from clip.model import VisionTransformer
from torchvision import transforms

from hw3.common.clip_models import clip_transform, is_local_checkpoint, load_clip
from hw3.common.download import timm_weights_file, timm_weights_source
from hw3.common.encoder_names import parse_encoder_name
from hw3.common.errors import UserError
from hw3.common.files import load_state_dict_file

# name: (image_size, patch_size, width, layers) of the OpenAI CLIP ViTs, to build them with random weights (tests)
CLIP_VITS = {"ViT-B/32": (224, 32, 768, 12), "ViT-B/16": (224, 16, 768, 12), "ViT-L/14": (224, 14, 1024, 24),
             "ViT-L/14@336px": (336, 14, 1024, 24)}

# How the weights' publishers preprocess, where timm 0.9.10's pretrained config says otherwise or nothing: open_clip's
# pretrained table (open_clip_torch 2.32.0, pretrained.py: _slpcfg and the DFN5B entries have resize_mode "squash",
# _pcfg "shortest"). "squash": resize both sides to the input size (the whole image, aspect not kept); "shortest":
# resize the short side to the input size, centre crop. Keyed by pretrained tag.
RESIZE_MODES = {"openai": "shortest", "dfn5b": "squash", "webli": "squash"}
# The activation the weights were trained with, where timm 0.9.10's architecture builds another, by pretrained tag:
# SigLIP (webli) was trained with the tanh approximation of GELU (big_vision: flax's nn.gelu, approximate=True;
# transformers' SiglipVisionConfig: hidden_act "gelu_pytorch_tanh"); timm 0.9.10 builds its SigLIP towers with exact
# GELU (nn.GELU). The two differ by at most ~5e-4 per activation (QuickGELU vs GELU: ~2e-2).
ACTIVATIONS = {"webli": "gelu_tanh"}


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
            tokens = timm_vit_tokens(self.backbone, images)
        return tokens.float()


def timm_vit_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """timm's forward_features: every token after the final norm (_timm_encoder keeps only the blocks up to the
    encoder's layer)."""
    return model.forward_features(images.to(next(model.parameters()).dtype))


def load_image_encoder(name: str, device="cpu", pretrained: bool = True, layer: int = -1) -> ImageEncoder:
    """The encoder called `name` (see the module docstring), its tokens taken from block `layer`. pretrained=False
    builds the same architecture with random weights (tests; nothing is downloaded); a local file always loads its
    weights."""
    encoder = parse_encoder_name(name)
    if encoder.kind == "timm":
        return _timm_encoder(name, device, pretrained, layer)
    if name in CLIP_VITS and not pretrained:
        image_size, patch_size, width, layers = CLIP_VITS[name]
        visual = VisionTransformer(image_size, patch_size, width, layers, heads=width // 64, output_dim=768)
        preprocess = clip_transform(image_size)
    elif encoder.kind == "clip" or is_local_checkpoint(encoder.file):
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


def openai_clip_sizes(state_dict: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """timm VisionTransformer arguments for the vision tower of an OpenAI-layout CLIP state_dict, inferred as
    clip.model.build_model does (heads = width // 64)."""
    conv = state_dict["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    depth = len({key.split(".")[3] for key in state_dict if key.startswith("visual.transformer.resblocks.")})
    hidden = state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    return dict(img_size=patch * grid, patch_size=patch, embed_dim=width, depth=depth, num_heads=width // 64,
                mlp_ratio=hidden / width)


def load_timm_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str) -> None:
    """Loads `state_dict` (any layout the model's timm module converts: timm, open_clip, OpenAI CLIP) into `model`
    with timm's own checkpoint filter, strictly: only a projection head the model does not have (num_classes=0) may
    be left over. Raises UserError listing what does not fit."""
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    own = model.state_dict()
    unused = [key for key in state_dict if key not in own and key.split(".")[0] == "head"]
    state_dict = {key: value for key, value in state_dict.items() if key not in unused}
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(f"{key} {list(value.shape)} vs {list(own[key].shape)}" for key, value in state_dict.items()
                   if key in own and value.shape != own[key].shape)
    problems = [f"{what}: {keys[:8]}{' ...' if len(keys) > 8 else ''}" for what, keys in (
        ("missing", missing), ("unexpected", unexpected), ("wrong shape (file vs model)", wrong)) if keys]
    if problems:
        raise UserError(f"{source} does not fit timm's {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def timm_preprocess(model: nn.Module) -> Tuple[Callable, int]:
    """(PIL image -> normalised tensor, input size) from the model's pretrained config, the resize mode as
    RESIZE_MODES says for its tag, the input size of the built model."""
    from timm.data import create_transform, resolve_data_config
    data_config = resolve_data_config({}, model=model)
    data_config["input_size"] = (3, *model.patch_embed.img_size)  # the built model's (differs with @<file> sizes)
    mode = RESIZE_MODES.get(model.pretrained_cfg.get("tag") or "")
    if mode is not None:
        data_config["crop_pct"] = 1.0  # the whole input size: no margin cropped away
        data_config["crop_mode"] = "squash" if mode == "squash" else "center"
    preprocess = transforms.Compose([lambda image: image.convert("RGB"), create_transform(**data_config)])
    return preprocess, data_config["input_size"][-1]


def _timm_encoder(name: str, device, pretrained: bool, layer: int, **model_args) -> ImageEncoder:
    """`name`: "timm:<model>" or "timm:<model>@<file>" (module docstring). `model_args` override the architecture's
    (tests: a tiny model in a real model's layout)."""
    import timm  # imported here: only timm encoders need it

    encoder = parse_encoder_name(name)
    model_name, file = encoder.timm_model, encoder.file
    try:
        config = timm.models.get_pretrained_cfg(model_name)  # None for an architecture without pretrained configs
    except RuntimeError as error:  # a known architecture, an unknown tag
        raise UserError(f"{name}: {error}") from None
    if config is not None and config.tag in ACTIVATIONS and "act_layer" not in model_args:
        model_args = dict(model_args, act_layer=ACTIVATIONS[config.tag])
    state_dict: Optional[Dict[str, torch.Tensor]] = None
    source = file
    if file:
        state_dict = load_state_dict_file(file, "a state_dict (timm, open_clip or OpenAI CLIP layout)")
        if "visual.conv1.weight" in state_dict:
            model_args = dict(openai_clip_sizes(state_dict), **model_args)
    model = timm.create_model(model_name, pretrained=False, num_classes=0, **model_args)
    blocks_up_to(model.blocks, layer)  # checks the range before any weights are read
    tag = model.pretrained_cfg.get("tag") or ""
    if not encoder.tag:
        warnings.warn(f"{name}: no pretrained tag given, timm uses its default {tag!r}")
    notes = " ".join(model.pretrained_cfg.get("notes") or ())
    if "QuickGELU" in notes and "_quickgelu_" not in encoder.model:
        warnings.warn(f"{name}: these weights were trained with QuickGELU (timm: {notes!r}); this variant computes "
                      "GELU (use the '_clip_quickgelu_' model of the same size)")
    if state_dict is None and pretrained:
        from timm.models import load_state_dict  # timm's reader: .safetensors or a torch file
        path = timm_weights_file(model_name)  # the Hugging Face cache first: no network once hw3_download.sh ran
        state_dict, source = load_state_dict(path), f"{path} ({'/'.join(timm_weights_source(model_name))})"
    if state_dict is not None:
        load_timm_weights(model, state_dict, source)
    model.blocks = model.blocks[:layer % len(model.blocks) + 1]  # the frozen blocks after `layer` are never run
    preprocess, image_size = timm_preprocess(model)
    return ImageEncoder(name, model.to(device), preprocess, model.patch_embed.grid_size, model.num_prefix_tokens,
                        model.num_features, image_size, layer)


def encoder_token_shape(name: str) -> Tuple[int, int, int]:
    """(tokens per image, width, input image size) of encoder `name`, without building the whole tower or reading
    any weights where that can be avoided: OpenAI CLIP names from their sizes, timm names from one block at the real
    width (about a second, whatever the tower's size); a local file is loaded. What the preflight sizes the feature
    cache with."""
    if name in CLIP_VITS:
        image_size, patch_size, width, _ = CLIP_VITS[name]
        return (image_size // patch_size) ** 2 + 1, width, image_size
    encoder = parse_encoder_name(name)
    if encoder.kind == "timm" and not encoder.file:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tag / activation warnings are the loader's to give
            built = _timm_encoder(name, "cpu", pretrained=False, layer=-1, depth=1)
    else:
        built = load_image_encoder(name, pretrained=False)
    return built.n_tokens, built.width, built.image_size
