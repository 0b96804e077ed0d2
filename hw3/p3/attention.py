"""Problem 3: the cross-attention of each generated caption token over the image patches, as heat maps on the image.

    results = caption_images(model, [open_image(path)], DecodeConfig())   # caption + attention maps
    figure = plot_caption_attention(results[0], layer=-1, head=None)     # the course's layout
    figure.savefig("bike.png")

How the maps are read. The caption comes from hw3.p2.generation.generate (beam search). Then ONE teacher-forced
forward pass of [<|endoftext|>, t1 .. tn] with the model recording its cross-attention gives, at query position i,
the attention the decoder used when it chose token t(i+1) (position n: when it chose the end token). Attention is
causal, so these are exactly the weights of the final beam's own decoding steps, whatever reordering the beam search
did (tests/test_attention_maps.py checks them against an incremental decode).

Maps: the encoder's non-patch tokens (CLS) are dropped and the patch attention renormalised to sum 1 (the share left
on CLS is kept in `prefix_share`); patches are reshaped to the encoder's grid. The grid covers only the part of the
image the encoder saw: CLIP resizes the short side and centre-crops, so `view_box` maps the grid back onto that region
of the original image (what lies outside is shown dimmed).

Sub-word tokens: the caption is split into words (a BPE token that starts with a space starts a new word,
punctuation is a word of its own); a word of several tokens shows the mean of its tokens' maps (the words list
keeps which tokens each word holds). `merge_subwords=False` gives one panel per BPE token instead.
"""
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from torchvision import transforms

from hw3.common.figures import add_image, frame_picture
from hw3.common.errors import UserError
from hw3.p2.generation import generate
from tokenizer import EOT_ID, BPETokenizer

END_TITLE = "<|endoftext|>"
Box = Tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the original image


@dataclass
class CaptionAttention:
    """A caption and its cross-attention. maps[layer]: [heads, n + 1, grid_h, grid_w], query position i = the
    attention used to choose caption token i (position n: the end token); patch attention sums to 1 per query."""
    image: Image.Image
    name: str
    token_ids: List[int]
    ended: bool  # the caption ended with <|endoftext|> (False: cut at the length limit)
    maps: Dict[int, torch.Tensor]
    prefix_share: Dict[int, torch.Tensor]  # layer -> [heads, n + 1]: attention mass on CLS/non-patch tokens
    view_box: Box

    @property
    def layers(self) -> List[int]:
        return sorted(self.maps)


def cross_attention_layers(model) -> List[int]:
    """The decoder layers of `model` that have cross-attention."""
    return [i for i, block in enumerate(model.decoder.transformer.h) if block.cross_attn is not None]


# ---- where the patch grid lies on the original image ------------------------------------------------------------

def _flat_transforms(preprocess) -> List:
    steps = []
    for step in getattr(preprocess, "transforms", [preprocess]):
        steps += _flat_transforms(step) if hasattr(step, "transforms") else [step]
    return steps


def encoder_view_box(preprocess, width: int, height: int) -> Box:
    """The region of a width x height image that `preprocess` keeps (its Resize and CenterCrop steps, with
    torchvision's rounding), in pixels of the original image. Without such steps: the whole image."""
    x0, y0, x1, y1 = 0.0, 0.0, float(width), float(height)  # kept region, original pixels
    w, h = width, height  # current size in pixels of the transformed image
    for step in _flat_transforms(preprocess):
        if isinstance(step, transforms.Resize):
            size = step.size
            if isinstance(size, int) or len(size) == 1:
                short = size if isinstance(size, int) else size[0]
                new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
            else:
                new_h, new_w = size
            w, h = new_w, new_h
        elif isinstance(step, transforms.CenterCrop):
            crop_h, crop_w = step.size
            top, left = int(round((h - crop_h) / 2.0)), int(round((w - crop_w) / 2.0))
            scale_x, scale_y = (x1 - x0) / w, (y1 - y0) / h
            x0, y0 = x0 + left * scale_x, y0 + top * scale_y
            x1, y1 = x0 + crop_w * scale_x, y0 + crop_h * scale_y
            w, h = crop_w, crop_h
    return x0, y0, x1, y1


def pixel_weights(grid_map: np.ndarray, view_box: Box, width: int, height: int) -> np.ndarray:
    """[height, width] weights summing to sum(grid_map): each patch's weight spread evenly over the pixels whose
    centres fall in that patch's part of `view_box` (pixels outside the box get 0). Used for attention shares."""
    grid_h, grid_w = grid_map.shape
    x0, y0, x1, y1 = view_box
    cols = np.floor((np.arange(width) + 0.5 - x0) / (x1 - x0) * grid_w).astype(int)
    rows = np.floor((np.arange(height) + 0.5 - y0) / (y1 - y0) * grid_h).astype(int)
    inside = ((rows >= 0) & (rows < grid_h))[:, None] & ((cols >= 0) & (cols < grid_w))[None, :]
    cell = rows.clip(0, grid_h - 1)[:, None] * grid_w + cols.clip(0, grid_w - 1)[None, :]
    counts = np.bincount(cell[inside], minlength=grid_h * grid_w).astype(np.float64)
    per_pixel = np.divide(np.asarray(grid_map, np.float64).ravel(), counts, out=np.zeros(grid_h * grid_w),
                          where=counts > 0)
    return np.where(inside, per_pixel[cell], 0.0)


def smooth_map(grid_map: torch.Tensor, view_box: Box) -> np.ndarray:
    """The grid upsampled (bilinear) to the pixel size of `view_box`, for display."""
    x0, y0, x1, y1 = view_box
    size = (max(1, round(y1 - y0)), max(1, round(x1 - x0)))
    return F.interpolate(grid_map[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


# ---- captions and their attention -------------------------------------------------------------------------------

@torch.no_grad()
def attention_for_captions(model, pixels: torch.Tensor, captions: Sequence[Sequence[int]]
                           ) -> List[Tuple[Dict[int, torch.Tensor], Dict[int, torch.Tensor]]]:
    """One teacher-forced pass of [EOT] + caption per image (right-padded; attention is causal, so padding changes
    nothing before it). Returns per image (maps, prefix_share) as described in CaptionAttention."""
    encoder = model.encoder
    length = 1 + max(len(c) for c in captions)
    ids = torch.full((len(captions), length), EOT_ID, dtype=torch.long)
    for row, caption in enumerate(captions):
        ids[row, 1:1 + len(caption)] = torch.tensor(list(caption), dtype=torch.long)
    device = next(model.parameters()).device
    model.record_attention(True)
    try:
        model(ids.to(device), model.encode_images(pixels.to(device)))
        recorded = model.attention_maps()
    finally:
        model.record_attention(False)
    if not recorded:
        raise UserError("the model has no cross-attention layers to read")
    results = []
    for row, caption in enumerate(captions):
        maps, prefix_share = {}, {}
        for layer, weights in recorded.items():
            weights = weights[row, :, :len(caption) + 1].float().cpu()  # [heads, n + 1, N]
            patches = weights[..., encoder.n_prefix_tokens:]
            prefix_share[layer] = weights[..., :encoder.n_prefix_tokens].sum(-1)
            patches = patches / patches.sum(-1, keepdim=True).clamp_min(1e-12)
            maps[layer] = patches.reshape(*patches.shape[:2], *encoder.grid)
        results.append((maps, prefix_share))
    return results


def caption_images(model, images: Sequence[Image.Image], decode_config, names: Optional[Sequence[str]] = None,
                   batch_size: int = 16, progress=None) -> List[CaptionAttention]:
    """Captions `images` (PIL) with hw3.p2.generation.generate and reads each caption's cross-attention."""
    names = list(names) if names is not None else [f"image_{i}" for i in range(len(images))]
    device = next(model.parameters()).device
    results = []
    for start in range(0, len(images), batch_size):
        batch = [image.convert("RGB") for image in images[start:start + batch_size]]
        pixels = torch.stack([model.encoder.preprocess(image) for image in batch]).to(device)
        with torch.no_grad():
            captions = generate(model, model.encode_images(pixels), decode_config)
        for offset, (image, caption, (maps, prefix_share)) in enumerate(
                zip(batch, captions, attention_for_captions(model, pixels, captions))):
            results.append(CaptionAttention(
                image=image, name=names[start + offset], token_ids=list(caption),
                ended=len(caption) < decode_config.max_length, maps=maps, prefix_share=prefix_share,
                view_box=encoder_view_box(model.encoder.preprocess, *image.size)))
        if progress is not None:
            progress.update(len(batch))
    return results


# ---- words ------------------------------------------------------------------------------------------------------

def word_spans(token_texts: Sequence[str], merge_subwords: bool = True) -> List[Tuple[str, List[int]]]:
    """(word, caption token indices): a token starting with a space, or made of punctuation, or following
    punctuation starts a new word; the other tokens continue the word before them (sub-word pieces)."""
    spans: List[Tuple[str, List[int]]] = []
    for index, text in enumerate(token_texts):
        punctuation = not any(ch.isalnum() for ch in text)
        starts_word = (not spans or not merge_subwords or text.startswith(" ") or punctuation
                       or not any(ch.isalnum() for ch in spans[-1][0]))
        if starts_word:
            spans.append((text, [index]))
        else:
            spans[-1] = (spans[-1][0] + text, spans[-1][1] + [index])
    return [(word.strip(), indices) for word, indices in spans]


def caption_words(result: CaptionAttention, tokenizer: BPETokenizer,
                  merge_subwords: bool = True) -> List[Tuple[str, List[int]]]:
    return word_spans([tokenizer.decode([t]) for t in result.token_ids], merge_subwords)


def resolve_layer(result: CaptionAttention, layer: int) -> int:
    """A layer index of the decoder; negative counts from the last cross-attention layer (-1 = last)."""
    layers = result.layers
    if layer < 0:
        if -layer > len(layers):
            raise UserError(f"layer {layer}: the model has cross-attention in {len(layers)} layers {layers}")
        return layers[layer]
    if layer not in result.maps:
        raise UserError(f"layer {layer} has no cross-attention; layers with it: {layers}")
    return layer


def select_maps(result: CaptionAttention, layer: int = -1, head: Optional[int] = None) -> torch.Tensor:
    """[n + 1, grid_h, grid_w]: one layer's maps, heads averaged (head=None) or one head."""
    maps = result.maps[resolve_layer(result, layer)]
    if head is None:
        return maps.mean(0)
    if not 0 <= head < maps.shape[0]:
        raise UserError(f"head {head}: this layer has {maps.shape[0]} heads")
    return maps[head]


def word_maps(result: CaptionAttention, words: List[Tuple[str, List[int]]], layer: int = -1,
              head: Optional[int] = None) -> List[Tuple[str, torch.Tensor]]:
    """(title, grid map) per word (mean over its tokens), then the end token's map if the caption ended."""
    maps = select_maps(result, layer, head)
    panels = [(word, maps[indices].mean(0)) for word, indices in words]
    if result.ended:
        panels.append((END_TITLE, maps[len(result.token_ids)]))
    return panels


def peak_region(grid_map: torch.Tensor) -> str:
    """Where a word's attention peaks, in words a caption's reader can check against the image: the patch with the
    most attention, as its third of the encoder's view (top/middle/bottom, left/centre/right), with its share of the
    map ("top left, 12% of the attention")."""
    rows, cols = grid_map.shape
    index = int(torch.argmax(grid_map))
    row, col = divmod(index, cols)
    vertical = ("top", "middle", "bottom")[min(2, 3 * row // rows)]
    horizontal = ("left", "centre", "right")[min(2, 3 * col // cols)]
    place = "centre" if (vertical, horizontal) == ("middle", "centre") else f"{vertical} {horizontal}"
    share = float(grid_map.reshape(-1)[index] / grid_map.sum().clamp_min(1e-12))
    return f"{place}, {100 * share:.0f}% of the attention"


# ---- figures ----------------------------------------------------------------------------------------------------

def draw_attention(axis, image: Image.Image, grid_map: Optional[torch.Tensor], view_box: Box, title: str,
                   colour_map: str = "jet", alpha: float = 0.5) -> None:
    """The image, and (if given) the map over the region the encoder saw, scaled to its own maximum."""
    width, height = image.size
    add_image(axis, np.asarray(image), (0, 0, width, height), interpolation="bilinear")
    if grid_map is not None:
        heat = smooth_map(grid_map, view_box)
        heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-12)
        add_image(axis, colormaps[colour_map](heat, alpha=alpha), view_box, interpolation="bilinear")
        x0, y0, x1, y1 = view_box
        shade = (0, 0, 0, 0.55)  # the parts of the image the encoder never saw
        for box in ((0, 0, width, y0), (0, y1, width, height), (0, y0, x0, y1), (x1, y0, width, y1)):
            if box[2] - box[0] > 0.5 and box[3] - box[1] > 0.5:
                axis.add_patch(Rectangle(box[:2], box[2] - box[0], box[3] - box[1], color=shade, linewidth=0))
    frame_picture(axis, width, height)
    axis.set_title(title, fontsize=11)


def plot_caption_attention(result: CaptionAttention, tokenizer: Optional[BPETokenizer] = None, layer: int = -1,
                           head: Optional[int] = None, merge_subwords: bool = True, columns: int = 5,
                           title: Optional[str] = None, colour_map: str = "jet") -> Figure:
    """The course's layout: the image titled <|endoftext|>, one panel per word, then <|endoftext|> (the attention
    that chose to end). A headless matplotlib Figure; save it with figure.savefig(path)."""
    tokenizer = tokenizer or BPETokenizer()
    words = caption_words(result, tokenizer, merge_subwords)
    panels = [(END_TITLE, None)] + word_maps(result, words, layer, head)
    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    width, height = result.image.size
    panel_w = 2.6
    figure = Figure(figsize=(panel_w * columns, panel_w * height / width * rows + 0.5 * rows + 0.6))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, (word, grid_map) in zip(axes, panels):
        draw_attention(axis, result.image, grid_map, result.view_box, word, colour_map)
    for axis in axes[len(panels):]:
        axis.axis("off")
    caption = tokenizer.decode(result.token_ids).strip()
    which = f"layer {resolve_layer(result, layer)}, " + ("heads averaged" if head is None else f"head {head}")
    figure.suptitle(title or f"{result.name}: \"{caption}\"  ({which})", fontsize=12)
    figure.tight_layout()
    return figure
