"""The toy world: an offline stand-in for hw3_data with tiny "pretrained" CLIP and GPT-2 models that really learn.

Scenes hold 1-3 coloured shapes on noisy, tinted backgrounds; captions are generated from the scene. One command
writes the course layout (p1_data, p2_data, p3_data), the tiny CLIP (`clip.pt`, OpenAI state_dict layout), the tiny
GPT-2 LM (`decoder_model.bin`, course format) and `boxes.json` (object boxes and held-out colour-shape pairs):

    python3 toyworld.py DIR [--small] [--seed S]        (build_toy_world; ToyWorld(DIR) names its files)

The result is cached: DIR/toyworld.json stores a hash of the generator source (this package's three modules) and
settings, and a build with the same hash returns at once. Builds go to a temporary folder renamed into place, under a
file lock.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from decoder import course_state_dict
from hw3.common.clip_models import clip_resize_crop
from hw3.common.errors import UserError
from hw3.common.layout import CourseLayout
from hw3.common.images import open_image
from hw3.toy import models
from hw3.toy.scenes import (CLASSES, COLOURS, HELD_OUT, SHAPES, Obj, captions_for, draw_scene, object_record,
                            sample_scene, single_object_image)

GENERATOR_VERSION = "toyworld-v4"


@dataclass(frozen=True)
class ToyWorld:
    """The files of a built toy world (what `build_toy_world` writes under `root`)."""
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).expanduser())

    @property
    def data(self) -> Path:  # the course layout: p1_data, p2_data, p3_data
        return self.root / "hw3_data"

    @property
    def layout(self) -> CourseLayout:
        return CourseLayout(self.data)

    @property
    def p1_val(self) -> Path:
        return self.layout.p1_val

    @property
    def id2label(self) -> Path:
        return self.layout.id2label

    @property
    def p2_data(self) -> Path:  # images/{train,val}/*.jpg, train.json, val.json
        return self.layout.p2_data

    @property
    def p3_images(self) -> Path:
        return self.layout.p3_images

    @property
    def clip(self) -> Path:  # the tiny CLIP: image encoder for P1/P2 and the CLIPScore model
        return self.root / "clip.pt"

    @property
    def decoder(self) -> Path:  # the tiny GPT-2 in decoder_model.bin's format
        return self.root / "decoder_model.bin"

    @property
    def boxes(self) -> Path:
        return self.root / "boxes.json"

    @property
    def manifest_path(self) -> Path:
        return self.root / "toyworld.json"

    def manifest(self) -> dict:
        """toyworld.json (generator version, hash, settings, build metrics), or {} when absent or unreadable."""
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return {}

    def check(self) -> "ToyWorld":
        """Raises UserError unless a built toy world is here."""
        if not self.manifest_path.is_file() or not self.boxes.is_file():
            raise UserError(f"{self.root} is not a built toy world (no toyworld.json / boxes.json): build one with "
                            "`python3 toyworld.py DIR`")
        return self


@dataclass
class WorldConfig:
    seed: int = 0
    small: bool = False
    p1_per_class: int = 50        # 2500 p1 val images, like the course
    p2_train: int = 5000
    p2_val: int = 500
    p1_size: int = 64             # p1 images are small square PNGs (the course's are 32 px)
    p2_size: int = 96             # p2 scenes are JPEGs at the CLIP input size (96 px) or larger, some not square
    clip_images_per_class: int = 192  # single-object images in the tiny CLIP's training set (128: 83% zero-shot)
    clip_epochs: int = 10         # the last 3 at 96 px, the others at 64 px (ClipConfig: progressive resizing)
    lm_epochs: int = 2
    threads: int = 2              # torch CPU threads while training (deterministic algorithms on): fixed in code

    @classmethod
    def make(cls, small: bool = False, seed: int = 0) -> "WorldConfig":
        if small:
            return cls(seed=seed, small=True, p1_per_class=4, p2_train=400, p2_val=50, clip_images_per_class=16,
                       clip_epochs=2, lm_epochs=2)
        return cls(seed=seed)


# ---------------------------------------------------------------------------------------------------- writing
def write_p1(root: Path, config: WorldConfig) -> Dict[str, dict]:
    """p1_data/val/{class_id}_{image_id}.png (one dominant object) and id2label.json."""
    rng = np.random.default_rng([config.seed, 1])
    folder = root / "p1_data" / "val"
    folder.mkdir(parents=True)
    (root / "p1_data" / "id2label.json").write_text(json.dumps({str(i): c for i, c in enumerate(CLASSES)}, indent=4))
    boxes = {}
    for image_id in tqdm(range(config.p1_per_class), desc="p1 images", leave=False):
        for class_id, label in enumerate(CLASSES):
            image, obj = single_object_image(rng, label, config.p1_size)
            name = f"{class_id}_{image_id + 400}.png"
            image.save(folder / name)
            boxes[name] = {"width": config.p1_size, "height": config.p1_size, "objects": [object_record(obj)]}
    return boxes


def scene_image(rng: np.random.Generator, labels: List[str], size: int) -> Tuple[Image.Image, List[Obj]]:
    """A p2/p3 scene; one in five is wider or taller than square, its objects inside the centre square that CLIP's
    centre crop keeps."""
    width, height = size, size
    if rng.random() < 0.2:
        width, height = (size * 4 // 3, size) if rng.random() < 0.5 else (size, size * 4 // 3)
    x0, y0 = (width - size) // 2, (height - size) // 2
    scene = sample_scene(rng, labels, size, crop=(x0, y0, x0 + size, y0 + size))
    return draw_scene(rng, scene, width, height)


def write_p2(root: Path, config: WorldConfig) -> Dict[str, Dict[str, dict]]:
    """p2_data/images/{train,val}/*.jpg and {train,val}.json (COCO-like); train never shows a held-out pair."""
    rng = np.random.default_rng([config.seed, 2])
    text_rng = random.Random(config.seed * 1000 + 2)
    allowed = [label for label in CLASSES if label not in HELD_OUT]
    n_images = config.p2_train + config.p2_val
    stems = set()
    while len(stems) < n_images:  # half COCO-style (zero-padded 12 digits), half plain numbers (Flickr-like)
        number = int(rng.integers(1, 600000))
        stems.add(f"{number:012d}" if rng.random() < 0.5 else str(int(rng.integers(1000000000, 9999999999))))
    stems = sorted(stems)
    text_rng.shuffle(stems)
    next_caption_id = int(rng.integers(1, 100000))
    boxes = {}
    for split, split_stems, labels in (("train", stems[:config.p2_train], allowed),
                                       ("val", stems[config.p2_train:], CLASSES)):
        folder = root / "p2_data" / "images" / split
        folder.mkdir(parents=True)
        annotations, images, split_boxes = [], [], {}
        for stem in tqdm(split_stems, desc=f"p2 {split} images", leave=False):
            image, objects = scene_image(rng, labels, config.p2_size)
            name = f"{stem}.jpg"
            image.save(folder / name, quality=90)
            images.append({"file_name": name, "id": int(stem)})
            for caption in captions_for(text_rng, objects, *image.size):
                annotations.append({"caption": caption, "id": next_caption_id, "image_id": int(stem)})
                next_caption_id += int(rng.integers(1, 20))
            split_boxes[name] = {"width": image.size[0], "height": image.size[1],
                                 "objects": [object_record(o) for o in objects]}
        text_rng.shuffle(annotations)
        info = {"info": f"toyworld-{split}", "licenses": "", "annotations": annotations, "images": images}
        (root / "p2_data" / f"{split}.json").write_text(json.dumps(info, indent=1))
        boxes[f"p2_{split}"] = split_boxes
    return boxes


P3_IMAGES = {"bike.jpg": (4, 3, 2), "girl.jpg": (3, 4, 1), "sheep.jpg": (4, 3, 3), "ski.jpg": (4, 3, 2),
             "umbrella.jpg": (3, 4, 3)}  # name: (width ratio, height ratio, objects), like the course's photos


def write_p3(root: Path, config: WorldConfig) -> Dict[str, dict]:
    rng = np.random.default_rng([config.seed, 3])
    folder = root / "p3_data" / "images"
    folder.mkdir(parents=True)
    boxes = {}
    for name, (w_ratio, h_ratio, n_objects) in P3_IMAGES.items():
        side = config.p2_size * 4 // 3
        width, height = side * w_ratio // 4, side * h_ratio // 4
        size = min(width, height)
        x0, y0 = (width - size) // 2, (height - size) // 2
        while True:
            scene = sample_scene(rng, CLASSES, size, crop=(x0, y0, x0 + size, y0 + size))
            if len(scene) == n_objects:
                break
        image, objects = draw_scene(rng, scene, width, height)
        image.save(folder / name, quality=90)
        boxes[name] = {"width": width, "height": height, "objects": [object_record(o) for o in objects]}
    return boxes


def write_dataset(out_dir: Path, config: WorldConfig) -> dict:
    """Writes out_dir/hw3_data and out_dir/boxes.json (images and captions only, no models); returns the boxes."""
    root = Path(out_dir) / "hw3_data"
    boxes = {"generator_version": GENERATOR_VERSION, "settings": dataclasses.asdict(config),
             "colours": list(COLOURS), "shapes": SHAPES, "classes": CLASSES, "held_out_pairs": HELD_OUT,
             "held_out_note": "held-out colour-shape pairs never appear in p2 train images, train captions or the "
                              "tiny LM's data; they do appear in p2 val, p1 val and the tiny CLIP's single-object "
                              "pretraining images",
             "box_format": "[x0, y0, x1, y1] in pixels of the saved image", "splits": {}}
    boxes["splits"]["p1_val"] = write_p1(root, config)
    boxes["splits"].update(write_p2(root, config))
    boxes["splits"]["p3"] = write_p3(root, config)
    (Path(out_dir) / "boxes.json").write_text(json.dumps(boxes))
    return boxes


# ---------------------------------------------------------------------------------------------------- models
WEB_TEMPLATES = ["a photo of a {}.", "a {}.", "a big {}.", "a picture of a {}", "there is a {} on a noisy background.",
                 "one shape: a {}.", "a large {} in the center", "a {} on a noisy background"]


def clip_training_set(out_dir: Path, config: WorldConfig, boxes: dict):
    """The tiny CLIP's "web" data: fresh single-object images of all 50 classes with templated captions (group 0)
    and the p2 train images with their captions (group 1); uint8 images at the CLIP input size as CLIP's preprocess
    makes them, captions, keys (the objects shown), groups and (colour, shape) attributes of single objects."""
    size = models.ClipConfig().image_size
    rng = np.random.default_rng([config.seed, 4])
    images, captions, keys, groups, attributes = [], [], [], [], []
    for _ in tqdm(range(config.clip_images_per_class), desc="tiny CLIP training images", leave=False):
        for label in CLASSES:
            image, _ = single_object_image(rng, label, size)
            images.append(np.asarray(image))
            captions.append([t.format(label) for t in WEB_TEMPLATES])
            keys.append(label)
            groups.append(0)
            attributes.append(tuple(label.split()))
    resize = clip_resize_crop(size)
    world = ToyWorld(out_dir)
    annotations = json.loads((world.p2_data / "train.json").read_text())
    by_image = {}
    for item in annotations["annotations"]:
        by_image.setdefault(item["image_id"], []).append(item["caption"])
    for item in annotations["images"]:
        image = open_image(world.p2_data / "images" / "train" / item["file_name"])
        images.append(np.asarray(resize(image)))
        captions.append(by_image[item["id"]])
        objects = boxes["splits"]["p2_train"][item["file_name"]]["objects"]
        keys.append(" and ".join(sorted(f"{o['colour']} {o['shape']}" for o in objects)))
        groups.append(1)
        attributes.append(None)
    images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return images, captions, keys, groups, attributes


def p1_val_tensors(out_dir: Path):
    """p1 val images resized to the CLIP input size (bicubic, as CLIP's preprocessing) and their labels."""
    size = models.ClipConfig().image_size
    folder = ToyWorld(out_dir).p1_val
    names = sorted(os.listdir(folder))
    images = np.stack([np.asarray(open_image(folder / name).resize((size, size), Image.BICUBIC)) for name in names])
    labels = [int(name.split("_")[0]) for name in names]
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


def train_models(out_dir: Path, config: WorldConfig, boxes: dict, seconds: Dict[str, float]) -> dict:
    """Trains and saves clip.pt and decoder_model.bin; returns their metrics (CLIP learning curve, perplexities).
    Adds the time of each phase to `seconds`."""
    started = time.time()
    images, captions, keys, groups, attributes = clip_training_set(out_dir, config, boxes)
    val_images, val_labels = p1_val_tensors(out_dir)
    seconds["clip_data"] = round(time.time() - started, 1)
    started = time.time()
    clip_config = models.ClipConfig(epochs=config.clip_epochs, seed=config.seed)

    def evaluate(model) -> Dict[str, float]:
        return {"p1_val_acc": models.zero_shot_accuracy(model, val_images, val_labels, CLASSES)}
    model, history = models.train_tiny_clip(images, captions, keys, groups, clip_config, attributes, evaluate,
                                            extra_prompts=[f"a photo of a {c}." for c in CLASSES])
    world = ToyWorld(out_dir)
    torch.save(models.clip_state_dict(model), world.clip)
    seconds["clip"] = round(time.time() - started, 1)

    started = time.time()
    p2 = world.p2_data
    train_captions = [a["caption"] for a in json.loads((p2 / "train.json").read_text())["annotations"]]
    val_captions = [a["caption"] for a in json.loads((p2 / "val.json").read_text())["annotations"]]
    lm_config = models.LMConfig(epochs=config.lm_epochs, seed=config.seed)
    decoder, lm_metrics = models.train_tiny_lm(train_captions, lm_config, val_captions)
    torch.save(course_state_dict(decoder), world.decoder)
    seconds["lm"] = round(time.time() - started, 1)
    return {"clip": {"config": dataclasses.asdict(clip_config), "training_images": len(images),
                     "history": history},
            "lm": {"config": dataclasses.asdict(lm_config), **lm_metrics}}


# ---------------------------------------------------------------------------------------------------- build + cache
# The generator: a hash of these sources (this package's modules) and the settings decides whether a cached world
# is current.
SOURCES = ("world.py", "scenes.py", "models.py")


def settings_hash(config: WorldConfig) -> str:
    digest = hashlib.sha256(GENERATOR_VERSION.encode())
    digest.update(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    for name in SOURCES:
        digest.update((Path(__file__).resolve().parent / name).read_bytes())
    return digest.hexdigest()[:16]


def read_manifest(out_dir: Path) -> dict:
    return ToyWorld(out_dir).manifest()


def build_toy_world(out_dir, small: bool = False, seed: int = 0) -> Path:
    """Builds the toy world in `out_dir` (or finds it there already built with the same generator and settings)
    and returns its path. Concurrent builds of one folder wait on a lock; a build appears only when complete."""
    out_dir = Path(out_dir).expanduser().resolve()
    config = WorldConfig.make(small=small, seed=seed)
    digest = settings_hash(config)
    if read_manifest(out_dir).get("hash") == digest:
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "toyworld.json").exists():
        raise UserError(f"{out_dir} is not empty and holds no toy world: choose a new or empty folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if read_manifest(out_dir).get("hash") == digest:  # built by another process while we waited
            return out_dir
        staging = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
        torch.set_num_threads(config.threads)
        torch.use_deterministic_algorithms(True)  # with 2 threads the embedding rows' backward was not
        try:
            start, cpu_start = time.time(), time.process_time()
            boxes = write_dataset(staging, config)
            seconds = {"data": round(time.time() - start, 1)}
            metrics = train_models(staging, config, boxes, seconds)
            manifest = {"generator_version": GENERATOR_VERSION, "hash": digest,
                        "settings": dataclasses.asdict(config), "build_seconds": round(time.time() - start, 1),
                        "phase_seconds": seconds, "build_cpu_seconds": round(time.process_time() - cpu_start, 1),
                        **metrics}
            (staging / "toyworld.json").write_text(json.dumps(manifest, indent=1))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic)
        if out_dir.exists():
            retired = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.rename(out_dir, retired)
            os.rename(staging, out_dir)
            shutil.rmtree(retired)
        else:
            os.rename(staging, out_dir)
    return out_dir


def describe(out_dir, seconds: float) -> str:
    """What toyworld.py prints about a built world: version, hash, files, model quality."""
    world = ToyWorld(out_dir)
    manifest = world.manifest()
    small = ", small" if manifest["settings"]["small"] else ""
    lines = [f"toy world {manifest['generator_version']} (hash {manifest['hash']}, seed {manifest['settings']['seed']}"
             f"{small}) in {world.root} ({seconds:.1f} s; built in {manifest['build_seconds']} s)"]
    for path, what in [(world.data / "p1_data", "P1 val images + id2label.json"),
                       (world.p2_data, "P2 train/val images + train.json, val.json"),
                       (world.p3_images, "P3 images"), (world.clip, "tiny CLIP (OpenAI state_dict)"),
                       (world.decoder, "tiny GPT-2 LM (course format)"),
                       (world.boxes, "object boxes, held-out pairs"), (world.manifest_path, "manifest and metrics")]:
        lines.append(f"  {path}: {what}")
    phases = manifest.get("phase_seconds", {})
    if phases:
        lines.append("  build time by phase: " + ", ".join(f"{name} {seconds} s" for name, seconds in phases.items()))
    lines.append(f"  tiny CLIP p1 val accuracy: {manifest['clip']['history'][-1]['p1_val_acc']:.3f}; tiny LM val "
                 f"perplexity {manifest['lm']['val_perplexity']:.2f} (unigram "
                 f"{manifest['lm']['unigram_val_perplexity']:.2f})")
    return "\n".join(lines)
