"""Scenes of the toy world: coloured shapes on noisy backgrounds, their boxes, and captions generated from them."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {  # well separated hues plus white and black, so colour never needs fine judgement
    "red": (220, 30, 30), "orange": (255, 140, 0), "yellow": (245, 225, 30), "green": (30, 170, 50),
    "cyan": (0, 205, 215), "blue": (35, 60, 225), "purple": (140, 40, 200), "pink": (255, 110, 185),
    "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ["circle", "square", "triangle", "star", "cross"]  # silhouettes with distinct edge directions
CLASSES = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]  # 50 classes, id = index
# Five held-out pairs, one per shape, each with another colour: never in p2 train images, train captions, LM data.
HELD_OUT = [f"{colour} {SHAPES[(2 * i + 1) % len(SHAPES)]}" for i, colour in enumerate(COLOURS) if i % 2 == 0]
SIZE_WORDS = {"small": ["small", "small", "little", "tiny"], "large": ["large", "big", "big", "large"]}
SUPERSAMPLE = 4


@dataclass
class Obj:
    colour: str
    shape: str
    size: str                     # "small" or "large"
    box: List[int]                # [x0, y0, x1, y1] in pixels of the saved image

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def centre(self) -> Tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


# ---------------------------------------------------------------------------------------------------- rendering
def shape_points(shape: str, cx: float, cy: float, extent: float, angle: float) -> List[Tuple[float, float]]:
    """Polygon of a shape centred at (cx, cy) fitting an extent x extent box before rotation by `angle` radians."""
    r = extent / 2
    if shape == "circle":
        pts = [(r * math.cos(2 * math.pi * k / 48), r * math.sin(2 * math.pi * k / 48)) for k in range(48)]
    elif shape == "square":
        s = 0.85 * r
        pts = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif shape == "triangle":
        pts = [(0, -r), (r, 0.8 * r), (-r, 0.8 * r)]
    elif shape == "star":
        pts = [((r if k % 2 == 0 else 0.42 * r) * math.sin(math.pi * k / 5),
                -(r if k % 2 == 0 else 0.42 * r) * math.cos(math.pi * k / 5)) for k in range(10)]
    elif shape == "cross":
        t = r / 3
        pts = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t), (-r, -t),
               (-t, -t)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in pts]


def render_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A tinted mid-tone background with a gradient and smooth blotches (float HxWx3 in 0..255, noise added later)."""
    grey = rng.uniform(70, 185)
    tint = rng.normal(0, 18, size=3)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    direction = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(direction) * xx + np.sin(direction) * yy - 0.5) * rng.uniform(-40, 40)
    coarse = rng.normal(0, 12, size=(4, 4, 3)).astype(np.float32)
    blotches = np.asarray(Image.fromarray(coarse[..., 0]).resize((width, height), Image.BICUBIC))[..., None]
    return grey + tint + ramp[..., None] + blotches


def render_scene(rng: np.random.Generator, objects: List[Tuple[str, str, float, float, float, float]],
                 width: int, height: int) -> Tuple[Image.Image, List[List[int]]]:
    """Draws (colour, shape, cx, cy, extent, angle) objects, anti-aliased; returns the image and tight pixel boxes."""
    canvas = render_background(rng, width, height)
    boxes = []
    for colour, shape, cx, cy, extent, angle in objects:
        pts = shape_points(shape, cx, cy, extent, angle)
        mask = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
        ImageDraw.Draw(mask).polygon([(x * SUPERSAMPLE, y * SUPERSAMPLE) for x, y in pts], fill=255)
        alpha = np.asarray(mask.resize((width, height), Image.BOX), dtype=np.float32)[..., None] / 255
        rgb = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 12, size=3), 0, 255)
        canvas = canvas * (1 - alpha) + rgb * alpha
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        boxes.append([max(0, math.floor(min(xs))), max(0, math.floor(min(ys))),
                      min(width, math.ceil(max(xs))), min(height, math.ceil(max(ys)))])
    canvas = canvas + rng.normal(0, rng.uniform(4, 12), size=canvas.shape)
    return Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8)), boxes


# ---------------------------------------------------------------------------------------------------- scenes
def single_object_image(rng: np.random.Generator, label: str, size: int) -> Tuple[Image.Image, Obj]:
    """One dominant object (P1 style): large, roughly centred."""
    colour, shape = label.split()
    extent = rng.uniform(0.45, 0.7) * size
    cx, cy = rng.uniform(extent / 2 + 2, size - extent / 2 - 2, size=2)
    image, (box,) = render_scene(rng, [(colour, shape, cx, cy, extent, rng.uniform(-0.2, 0.2))], size, size)
    return image, Obj(colour, shape, "large", box)


def sample_scene(rng: np.random.Generator, labels: List[str], size: int, crop: Tuple[int, int, int, int] = None
                 ) -> List[Tuple[str, str, str, float, float, float]]:
    """1-3 distinct colour-shape objects, small or large, non-overlapping, placed inside `crop` (x0, y0, x1, y1).

    Returns (colour, shape, size word, cx, cy, extent) tuples.
    """
    x0, y0, x1, y1 = crop or (0, 0, size, size)
    side = min(x1 - x0, y1 - y0)
    n_objects = int(rng.choice([1, 2, 3], p=[0.25, 0.4, 0.35]))
    while True:
        chosen = rng.choice(len(labels), size=n_objects, replace=False)
        placed = []
        for index in chosen:
            size_word = "small" if rng.random() < 0.5 else "large"
            extent = side * (rng.uniform(0.17, 0.23) if size_word == "small" else rng.uniform(0.32, 0.4))
            for _ in range(50):
                cx, cy = rng.uniform(x0 + extent / 2 + 1, x1 - extent / 2 - 1), rng.uniform(y0 + extent / 2 + 1,
                                                                                               y1 - extent / 2 - 1)
                if all(math.hypot(cx - px, cy - py) > 0.6 * (extent + pe) + 2 for _, _, _, px, py, pe in placed):
                    break
            else:
                break
            colour, shape = labels[index].split()
            placed.append((colour, shape, size_word, cx, cy, extent))
        if len(placed) == n_objects:
            return placed


def draw_scene(rng: np.random.Generator, scene, width: int, height: int) -> Tuple[Image.Image, List[Obj]]:
    image, boxes = render_scene(rng, [(c, s, cx, cy, e, rng.uniform(-0.2, 0.2)) for c, s, _, cx, cy, e in scene],
                                width, height)
    return image, [Obj(c, s, size_word, box) for (c, s, size_word, *_), box in zip(scene, boxes)]


# ---------------------------------------------------------------------------------------------------- captions
def relation(a: Obj, b: Obj) -> str:
    """Where a is relative to b, or "" when the offset is not clearly horizontal or vertical."""
    dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
    if abs(dx) > 1.5 * abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    if abs(dy) > 1.5 * abs(dx):
        return "above" if dy < 0 else "below"
    return ""


def region(obj: Obj, width: int, height: int) -> str:
    cx, cy = obj.centre
    col = "left" if cx < width / 3 else "right" if cx > 2 * width / 3 else ""
    row = "top" if cy < height / 3 else "bottom" if cy > 2 * height / 3 else ""
    return f"{row} {col}".strip() or "center"


def captions_for(rng: random.Random, objects: List[Obj], width: int, height: int, n: int = 5) -> List[str]:
    """`n` distinct captions with varied wording, object order, size words and relations."""
    def phrase(obj: Obj) -> str:
        words = f"{rng.choice(SIZE_WORDS[obj.size])} " if rng.random() < 0.6 else ""
        words += f"{obj.colour} {obj.shape}"
        return ("an " if words[0] in "aeiou" else "a ") + words

    def listing(objs: List[Obj]) -> str:
        words = [phrase(o) for o in objs]
        return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]

    counts = {1: "one shape", 2: "two shapes", 3: "three shapes"}
    candidates = {}  # keyed without the final period, so two captions differ in words
    for _ in range(200):
        if len(candidates) >= 4 * n:
            break
        objs = rng.sample(objects, len(objects))
        pairs = [(a, b, relation(a, b)) for a in objs for b in objs if a is not b and relation(a, b)]
        kind = rng.randrange(6)
        if kind == 0:
            text = listing(objs)
        elif kind == 1:
            text = f"{counts[len(objs)]}: {listing(objs)}"
        elif kind == 2:
            text = f"there is {listing(objs)} on a noisy background"
        elif kind == 3 and pairs:
            a, b, rel = rng.choice(pairs)
            rest = [o for o in objs if o is not a and o is not b]
            text = f"{phrase(a)} {rel} {phrase(b)}" + (f", and {listing(rest)}" if rest else "")
        elif kind == 4 and pairs:
            a, b, rel = rng.choice(pairs)
            text = f"{phrase(a)} is {rel} {phrase(b)}"
        else:
            obj = objs[0]
            text = f"{phrase(obj)} in the {region(obj, width, height)}"
            if len(objs) > 1:
                text += f" with {listing(objs[1:])}"
        text = text[0].upper() + text[1:]
        candidates.setdefault(text, text + "." if rng.random() < 0.8 else text)
    return rng.sample([candidates[key] for key in sorted(candidates)], n)


def object_record(obj: Obj) -> dict:
    return {"colour": obj.colour, "shape": obj.shape, "size": obj.size, "box": obj.box}
