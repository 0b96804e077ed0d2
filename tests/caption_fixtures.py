"""A miniature toy world for fast p2 training tests: a few coloured-square JPEGs with captions in the course layout,
a tiny random CLIP (32 px, patch 8: 4x4 grid + CLS, width 64) and a tiny random GPT-2 (2 layers, width 64, the real
50257-token vocabulary) in the course's decoder_model.bin format. Same file layout as the toy world
(hw3/toy/world.py), so `p2_train.py --toy-world DIR` takes it. Imported by tests/test_caption_data.py and tests/test_p2_train.py.
"""
import json
from pathlib import Path

import numpy as np
import torch
from clip.model import CLIP
from PIL import Image

from decoder import Decoder, GPTConfig, course_state_dict

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
MINI_GPT = GPTConfig(n_layer=2, n_head=1, n_embd=64)


def write_split(folder: Path, split: str, names, rng: np.random.Generator, first_id: int) -> None:
    images, annotations = [], []
    (folder / "images" / split).mkdir(parents=True)
    for i, name in enumerate(names):
        colour = list(COLOURS)[i % len(COLOURS)]
        pixels = rng.integers(0, 60, (40, 48, 3)).astype(np.uint8)
        pixels[10:30, 12:36] = COLOURS[colour]
        Image.fromarray(pixels).save(folder / "images" / split / f"{name}.jpg")
        image_id = first_id + i
        images.append({"file_name": f"{name}.jpg", "id": image_id})
        for j, caption in enumerate((f"A {colour} square.", f"There is a {colour} square on a dark background.")):
            annotations.append({"caption": caption, "id": 10 * image_id + j, "image_id": image_id})
    (folder / f"{split}.json").write_text(json.dumps({"images": images, "annotations": annotations}))


def make_mini_world(root: Path, n_train: int = 12, n_val: int = 4) -> Path:
    root = Path(root)
    data = root / "hw3_data" / "p2_data"
    rng = np.random.default_rng(0)
    write_split(data, "train", [f"{i:06d}" for i in range(n_train)], rng, 100)
    write_split(data, "val", [f"v{i:05d}" for i in range(n_val)], rng, 900)
    torch.manual_seed(0)
    torch.save(CLIP(32, 32, 1, 64, 8, 77, 49408, 64, 1, 1).state_dict(), str(root / "clip.pt"))
    torch.save(course_state_dict(Decoder(MINI_GPT)), str(root / "decoder_model.bin"))
    return root
