"""Problem 2 inference: caption every image of a folder with the trained captioner (what hw3_2.sh runs).

    model = load_captioner(checkpoint, "decoder_model.bin", device)       # hw3.p2.checkpoint
    captions, errors = caption_files(model, list_image_files(folder), DecodeConfig())
    write_predictions("out.json", stem_keyed(captions))                   # {file stem: caption}

Images are read by hw3.common.images (the reader training and validation use), preprocessed by the encoder's own
transform and decoded by hw3.p2.generation (batched beam search with the key/value cache). A file that cannot be
read is reported and captioned FALLBACK_CAPTION, so the scorer's check that every image has a caption still holds.
"""
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from hw3.common.files import image_key, write_json_atomically
from hw3.common.images import ReadableImageFiles
from hw3.p2.generation import DecodeConfig, autocast_for, caption_images
from hw3.p2.model import CaptionModel
from tokenizer import BPETokenizer

FALLBACK_CAPTION = "A picture of something."  # for files that cannot be read as images

Batch = Tuple[List[str], torch.Tensor, Dict[str, str]]


def encoded_batches(model: CaptionModel, paths: Sequence[Path], batch_size: int = 32, num_workers: int = 4,
                    device: str = "cpu", desc: str = "captioning") -> Iterator[Batch]:
    """Per batch: (names of the readable files, their image tokens [b, N, D] on `device`, {name: why unreadable})."""
    dataset = ReadableImageFiles(paths, model.encoder.preprocess, model.encoder.image_size)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        pin_memory=torch.device(device).type == "cuda")
    for images, indices, messages in tqdm(loader, desc=desc, unit="batch"):
        names = [paths[i].name for i in indices.tolist()]
        errors = {name: message for name, message in zip(names, messages) if message}
        readable = [i for i, message in enumerate(messages) if not message]
        images = images[readable].to(device, non_blocking=True)
        with torch.no_grad(), autocast_for(images.device):
            tokens = model.encode_images(images) if readable else images.new_zeros(0)
        yield [names[i] for i in readable], tokens, errors


def caption_files(model: CaptionModel, paths: Sequence[Path], decode: DecodeConfig, batch_size: int = 32,
                  num_workers: int = 4, device: str = "cpu") -> Tuple[Dict[str, str], Dict[str, str]]:
    """({file name: caption}, {file name: why it could not be read}) for `paths`; unreadable files get
    FALLBACK_CAPTION."""
    tokenizer = BPETokenizer()
    captions, errors = {}, {}
    for names, tokens, batch_errors in encoded_batches(model, paths, batch_size, num_workers, device):
        errors.update(batch_errors)
        captions.update(dict.fromkeys(batch_errors, FALLBACK_CAPTION))
        if names:
            captions.update(zip(names, caption_images(model, tokens, decode, tokenizer)))
    return captions, errors


def stem_keyed(captions: Dict[str, str]) -> Dict[str, str]:
    """{file name: caption} -> {file name without extension: caption}; a stem seen twice keeps the first file's."""
    result = {}
    for name in sorted(captions):
        stem = image_key(name)
        if stem in result:
            print(f"warning: {name} has the same stem as another image; keeping the first one's caption",
                  file=sys.stderr)
            continue
        result[stem] = captions[name]
    return result


def write_predictions(path: str, predictions: Dict[str, str]) -> None:
    """The prediction JSON, whole or not at all (ASCII escapes: a key from a file name that is not valid UTF-8
    loads back as the very string the file system gave); creates the parent folder."""
    write_json_atomically(path, predictions, indent=1, sort_keys=True)
