"""Caption training data in the course layout: annotations, tokenised captions, images (or their cached encoder
tokens), and batches with the course's input/target shift (tokenizer.make_caption_batch).

    split = read_split("p2_data/train.json", "p2_data/images/train")
    images = ImageFiles(split.paths, encoder.preprocess)                          # preprocessed images, or
    images = feature_cache(encoder, split.paths, "feature_cache", device)         # frozen tokens, fp16 memmap
    data = CaptionDataset(images, tokenize_captions(split, BPETokenizer(), 60), per_image=True)
    loader = DataLoader(data, batch_size=32, collate_fn=collate_captions)       # -> CaptionBatch

Because the encoder is frozen, its tokens for an image never change: `feature_cache` computes them once,
stores them as float16 in a .npy file next to a JSON description, and reads them back memory-mapped, so later runs
with the same encoder and images skip the encoder entirely.
"""
import fcntl
import hashlib
import json
import os
import random
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from hw3.common.errors import UserError
from hw3.common.files import image_key, read_json, write_json_atomically
from hw3.common.images import ImageFiles
from hw3.p2.encoder import ImageEncoder
from tokenizer import BPETokenizer, make_caption_batch


@dataclass
class CaptionSplit:
    """The images of one split (annotation order) and the reference captions of each."""
    images_root: str
    file_names: List[str]
    captions: List[List[str]]

    @property
    def keys(self) -> List[str]:  # prediction keys: file names without extension
        return [image_key(name) for name in self.file_names]

    @property
    def paths(self) -> List[str]:
        return [os.path.join(self.images_root, name) for name in self.file_names]


def read_split(annotation_file: str, images_root: str) -> CaptionSplit:
    """Reads a course annotation file ({"images": [{file_name, id}], "annotations": [{caption, image_id}]}). Keeps
    the images with at least one caption, as the course's scorer does."""
    data = read_json(annotation_file, "caption annotation file")
    try:
        file_names = {image["id"]: image["file_name"] for image in data["images"]}
        captions: Dict[int, List[str]] = {}
        for annotation in data["annotations"]:
            if annotation["image_id"] not in file_names:
                raise UserError(f"{annotation_file}: annotation {annotation.get('id')} names unknown image_id "
                                f"{annotation['image_id']}")
            captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
    except (KeyError, TypeError) as error:
        raise UserError(f"{annotation_file} is not a course caption file: {error!r}") from error
    ids = [image_id for image_id in file_names if image_id in captions]
    if not ids:
        raise UserError(f"{annotation_file} has no captioned images")
    missing = [file_names[i] for i in ids if not os.path.isfile(os.path.join(images_root, file_names[i]))]
    if missing:
        raise UserError(f"{len(missing)} images of {annotation_file} are not in {images_root}, e.g. {missing[:3]}")
    return CaptionSplit(images_root, [file_names[i] for i in ids], [captions[i] for i in ids])


def tokenize_captions(split: CaptionSplit, tokenizer: BPETokenizer, max_len: int) -> List[List[List[int]]]:
    """Token ids of every caption of every image, cut to max_len tokens (the end token comes on top)."""
    return [[tokenizer.encode(caption.strip())[:max_len] for caption in captions]
            for captions in tqdm(split.captions, desc="tokenizing captions", leave=False)]


# ---- images -----------------------------------------------------------------------------------------------------

class FeatureCache(Dataset):
    """Cached encoder tokens: item i -> float16 tensor [N, D] of image i, read from a memory-mapped .npy file."""

    def __init__(self, path: str):
        self.path = path
        self.features = np.load(path, mmap_mode="r")

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.features[index]))


def _encoder_fingerprint(name: str) -> str:
    """An encoder's name, plus its weights file's size and modification time when it names a local file (a CLIP
    state_dict path, or timm:NAME@FILE): other weights under the same name give another key."""
    architecture, at, file = name.rpartition("@") if name.startswith("timm:") else ("", "", name)
    if os.path.isfile(file):
        stat = os.stat(file)
        return f"{architecture}{at}{os.path.abspath(file)}:{stat.st_size}:{stat.st_mtime_ns}"
    return name


def feature_cache_description(encoder_name: str, layer: int, image_size: int, paths: Sequence[str]) -> dict:
    """What a feature cache file holds, the key of its name: the encoder (_encoder_fingerprint), the layer its
    tokens come from, its input size and the images' absolute paths, in order."""
    return {"encoder": _encoder_fingerprint(encoder_name), "layer": layer, "image_size": image_size,
            "paths": [os.path.abspath(p) for p in paths]}


def feature_cache_path(cache_dir: str, encoder_name: str, layer: int, image_size: int, paths: Sequence[str]) -> str:
    """The .npy file `feature_cache` keeps these images' tokens in: features-<16 hex digits of the sha256 of
    feature_cache_description>.npy in `cache_dir`, its description beside it as .json. It exists only once whole."""
    description = feature_cache_description(encoder_name, layer, image_size, paths)
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"features-{digest}.npy")


def feature_cache(encoder: ImageEncoder, paths: Sequence[str], cache_dir: str, device="cpu", batch_size: int = 64,
                  num_workers: int = 0) -> FeatureCache:
    """The encoder's tokens of `paths` (unaugmented), from `cache_dir` if computed before, else computed now (fp16)
    and stored there, in the file feature_cache_path names."""
    key = (encoder.name, encoder.layer, encoder.image_size, paths)
    description, path = feature_cache_description(*key), feature_cache_path(cache_dir, *key)
    os.makedirs(cache_dir, exist_ok=True)
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once with the same images: one computes, the other waits
        if os.path.isfile(path):
            cache = FeatureCache(path)
            if len(cache) == len(paths):
                return cache
        shape = (len(paths), encoder.n_tokens, encoder.width)
        partial = f"{path}.{os.getpid()}.partial"
        features = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=shape)
        loader = DataLoader(ImageFiles(paths, encoder.preprocess), batch_size=batch_size, num_workers=num_workers)
        start = 0
        for images in tqdm(loader, desc=f"caching encoder tokens {list(shape)}", leave=False):
            tokens = encoder(images.to(device))
            features[start:start + len(tokens)] = tokens.half().cpu().numpy()
            start += len(tokens)
        features.flush()
        del features
        write_json_atomically(os.path.splitext(path)[0] + ".json",
                              dict(description, shape=list(shape), dtype="float16"))
        os.replace(partial, path)  # atomic: a half-written cache is never picked up
    return FeatureCache(path)


# ---- captions ---------------------------------------------------------------------------------------------------

class CaptionBatch(NamedTuple):
    images: torch.Tensor      # [B, 3, S, S] preprocessed images, or [B, N, D] cached encoder tokens
    input_ids: torch.Tensor   # [B, K]: 50256, t1..tN, 50256, pad 50256 ...
    targets: torch.Tensor     # [B, K]: t1..tN, 50256, -100 ...
    image_index: torch.Tensor  # [B] index of each image in its split

    def to(self, device: torch.device) -> "CaptionBatch":
        return CaptionBatch(*(t.to(device, non_blocking=True) for t in self))


class CaptionDataset(Dataset):
    """(image, caption) pairs. per_image=False: every caption is an item (an epoch sees each caption once);
    per_image=True: every image is an item, with one of its captions drawn at random per epoch (`set_epoch`), which
    makes epochs shorter by the number of captions per image."""

    def __init__(self, images: Dataset, captions: List[List[List[int]]], per_image: bool = False, seed: int = 0):
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but captions for {len(captions)}")
        self.images, self.captions, self.per_image, self.seed, self.epoch = images, captions, per_image, seed, 0
        self.pairs = [(i, j) for i, caps in enumerate(captions) for j in range(len(caps))]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.captions) if self.per_image else len(self.pairs)

    def __getitem__(self, index: int):
        if self.per_image:
            image = index
            caption = random.Random(f"{self.seed}-{self.epoch}-{index}").randrange(len(self.captions[index]))
        else:
            image, caption = self.pairs[index]
        return self.images[image], self.captions[image][caption], image


def collate_captions(items) -> CaptionBatch:
    images, tokens, index = zip(*items)
    input_ids, targets = make_caption_batch(tokens)
    return CaptionBatch(torch.stack(images), input_ids, targets, torch.tensor(index))


def caption_vocabulary(captions: List[List[List[int]]], extra: Sequence[int] = ()) -> torch.Tensor:
    """Sorted ids of every token in the captions, plus `extra` (e.g. the end token)."""
    return torch.tensor(sorted({t for caps in captions for tokens in caps for t in tokens} | set(extra)))


def image_batches(images: Dataset, batch_size: int, num_workers: int = 0, limit: Optional[int] = None) -> DataLoader:
    """Images (or cached tokens) in order, the first `limit` only when given: for validation."""
    if limit:
        images = torch.utils.data.Subset(images, range(min(limit, len(images))))
    return DataLoader(images, batch_size=batch_size, num_workers=num_workers)
