"""Grounding score of the cross-attention on images whose objects' boxes are known (a toy world's boxes.json).

For each generated word that names a colour or a shape of an object in the image, the share of the word's attention
mass (patch attention, mapped onto the image region the encoder saw, see hw3.p3.attention.pixel_weights) that falls
in the box of the object(s) with that colour or shape. The baseline is the share uniform attention over the patches
would put there (about the box's share of the seen area). Per layer: the mean share against the mean baseline,
heads averaged, and the best single head. Words naming something absent from the image are counted, not scored.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from hw3.p3.attention import Box, CaptionAttention, caption_words, pixel_weights

TABLE_COLUMNS = ["layer", "words", "mean_share", "mean_baseline", "ratio", "colour_share", "shape_share",
                 "best_head", "best_head_share"]


@dataclass
class WordGrounding:
    image: str
    word: str
    kind: str  # "colour" or "shape"
    objects: int  # how many objects in the image have that colour / shape
    baseline: float
    shares: Dict[int, List[float]]  # layer -> share per head
    shares_mean: Dict[int, float]  # layer -> share of the head-averaged map


def box_mask(boxes: Sequence[Sequence[float]], width: int, height: int) -> np.ndarray:
    """[height, width] booleans: pixels whose centres lie in any of the [x0, y0, x1, y1] boxes."""
    xs, ys = np.arange(width) + 0.5, np.arange(height) + 0.5
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask |= ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]
    return mask


def attention_share(grid_map: torch.Tensor, view_box: Box, mask: np.ndarray) -> float:
    """Share of the (patch-normalised) map's mass inside `mask`."""
    height, width = mask.shape
    weights = pixel_weights(grid_map.numpy(), view_box, width, height)
    return float(weights[mask].sum() / max(weights.sum(), 1e-12))


def ground_caption(result: CaptionAttention, objects: List[dict], tokenizer, colours: Sequence[str],
                   shapes: Sequence[str]) -> List[WordGrounding]:
    """Scores every colour/shape word of the caption against the image's objects (boxes.json records)."""
    width, height = result.image.size
    grid_h, grid_w = next(iter(result.maps.values())).shape[-2:]
    uniform = torch.full((grid_h, grid_w), 1.0 / (grid_h * grid_w))
    records = []
    for word, indices in caption_words(result, tokenizer):
        word = word.lower()
        kind = "colour" if word in colours else "shape" if word in shapes else None
        if kind is None:
            continue
        boxes = [o["box"] for o in objects if o[kind] == word]
        if not boxes:
            records.append(WordGrounding(result.name, word, kind, 0, float("nan"), {}, {}))
            continue
        mask = box_mask(boxes, width, height)
        shares, shares_mean = {}, {}
        for layer, maps in result.maps.items():
            word_map = maps[:, indices].mean(1)  # [heads, grid_h, grid_w]
            shares[layer] = [attention_share(head_map, result.view_box, mask) for head_map in word_map]
            shares_mean[layer] = attention_share(word_map.mean(0), result.view_box, mask)
        records.append(WordGrounding(result.name, word, kind, len(boxes),
                                     attention_share(uniform, result.view_box, mask), shares, shares_mean))
    return records


def grounding_table(records: List[WordGrounding]) -> List[dict]:
    """One row per layer (TABLE_COLUMNS) over the scored words (those naming something present)."""
    scored = [r for r in records if r.objects]
    if not scored:
        return []
    baseline = float(np.mean([r.baseline for r in scored]))
    rows = []
    for layer in sorted(scored[0].shares_mean):
        by_kind = {kind: [r.shares_mean[layer] for r in scored if r.kind == kind] for kind in ("colour", "shape")}
        head_means = np.mean([r.shares[layer] for r in scored], axis=0)
        mean_share = float(np.mean([r.shares_mean[layer] for r in scored]))
        rows.append({"layer": layer, "words": len(scored), "mean_share": mean_share, "mean_baseline": baseline,
                     "ratio": mean_share / baseline,
                     "colour_share": float(np.mean(by_kind["colour"])) if by_kind["colour"] else float("nan"),
                     "shape_share": float(np.mean(by_kind["shape"])) if by_kind["shape"] else float("nan"),
                     "best_head": int(head_means.argmax()), "best_head_share": float(head_means.max())})
    return rows


def best_layer(rows: List[dict]) -> Optional[int]:
    """The layer whose head-averaged maps put the most attention on the named objects (None: nothing scored)."""
    return max(rows, key=lambda row: row["mean_share"])["layer"] if rows else None


def summarise(records: List[WordGrounding], rows: List[dict]) -> dict:
    absent = [r for r in records if not r.objects]
    return {"table": rows, "best_layer": best_layer(rows),
            "words_scored": sum(1 for r in records if r.objects), "words_absent": len(absent),
            "absent_examples": sorted({f"{r.image}: {r.word}" for r in absent})[:20],
            "meets_2x_baseline": bool(rows) and max(row["ratio"] for row in rows) >= 2.0}
