"""Problem 2 inference: caption every image in a folder with the trained captioner -> JSON {file stem: caption}.

    python3 p2_inference.py IMAGE_DIR OUT_JSON DECODER_BIN [--checkpoint PATH] [--beam-size 3] ...
    bash hw3_2.sh IMAGE_DIR OUT_JSON DECODER_BIN [same options]

The model is rebuilt from the config stored in the checkpoint (default: where `bash hw3_download.sh` puts
checkpoints.json's "p2_best"): the image encoder from its source (`--encoder` overrides it, e.g. the toy world's
clip.pt), GPT-2 from DECODER_BIN, then the trained tensors. Loading fails, naming the keys, when the checkpoint has a
tensor the model does not use, lacks one a trainable parameter needs, or has one of the wrong shape; afterwards every
trained tensor is checked to hold the checkpoint's values.

Every .jpg/.jpeg/.png file directly in IMAGE_DIR gets an entry; a file that cannot be read is reported and captioned
FALLBACK_CAPTION, so the scorer's check that every image has a caption still holds. Decoding: generation.py (batched
beam search with the key/value cache; beam size 1 = greedy).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioner import CaptionModel, build_caption_model, load_trainable, read_checkpoint
from generation import DecodeConfig, autocast_for, caption_images
from hw3_download import checkpoint_path
from p1_clip import ImageFiles
from tokenizer import BPETokenizer

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
FALLBACK_CAPTION = "A picture of something."  # for files that cannot be read as images
DEFAULT_DECODE = DecodeConfig(beam_size=3, max_length=30, length_penalty=1.0, no_repeat_ngram_size=0)


def default_checkpoint() -> Path:
    return checkpoint_path("p2_best")


def load_model(checkpoint: str, decoder_bin: str, device: str, encoder: Optional[str] = None) -> CaptionModel:
    """The captioner of `checkpoint` (see the module docstring), in eval mode on `device`."""
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}\nRun `bash hw3_download.sh` first to fetch it, "
                                "or pass --checkpoint PATH.")
    if not os.path.isfile(decoder_bin):
        raise FileNotFoundError(f"decoder weights not found: {decoder_bin}")
    config, tensors = read_checkpoint(checkpoint)
    model = build_caption_model(config, decoder_bin, device, encoder=encoder)
    load_trainable(model, tensors, source=checkpoint)
    model.eval()
    own = dict(model.named_parameters())
    differ = sorted(key for key, tensor in tensors.items() if not torch.equal(own[key].detach().cpu(), tensor))
    if differ:
        raise ValueError(f"{checkpoint}: these tensors did not arrive in the model: {differ}")
    return model


def list_images(folder: str) -> List[Path]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(path for path in Path(folder).iterdir()
                  if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


Batch = Tuple[List[str], torch.Tensor, Dict[str, str]]


def encoded_batches(model: CaptionModel, paths: Sequence[Path], batch_size: int = 32, num_workers: int = 4,
                    device: str = "cpu", desc: str = "captioning") -> Iterator[Batch]:
    """Per batch: (names of the readable files, their image tokens [b, N, D] on `device`, {name: why unreadable})."""
    dataset = ImageFiles(paths, model.encoder.preprocess, model.encoder.image_size)
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
        stem = Path(name).stem
        if stem in result:
            print(f"warning: {name} has the same stem as another image; keeping the first one's caption",
                  file=sys.stderr)
            continue
        result[stem] = captions[name]
    return result


def write_json(path: str, predictions: Dict[str, str]):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        json.dump(predictions, file, indent=1, ensure_ascii=False, sort_keys=True)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("image_dir", help="folder of images (.jpg/.jpeg/.png, any names)")
    parser.add_argument("output_json", help="where to write {file stem: caption} (parent folders are created)")
    parser.add_argument("decoder_bin", help="the course's GPT-2 weights (decoder_model.bin)")
    parser.add_argument("--checkpoint", default=None,
                        help=f"trained checkpoint (default: {default_checkpoint()}, fetched by hw3_download.sh)")
    parser.add_argument("--encoder", default=None,
                        help="image encoder name or CLIP state_dict path, instead of the one in the checkpoint's config")
    parser.add_argument("--beam-size", type=int, default=DEFAULT_DECODE.beam_size, help="1 = greedy")
    parser.add_argument("--max-length", type=int, default=DEFAULT_DECODE.max_length,
                        help="most tokens per caption, the end token included")
    parser.add_argument("--length-penalty", type=float, default=DEFAULT_DECODE.length_penalty,
                        help="finished captions are ranked by log-prob / length ** this (0 = raw log-prob)")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=DEFAULT_DECODE.no_repeat_ngram_size,
                        help="forbid repeating any n-gram of this size (0 = off)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image-loading processes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0:
        parser.error("--batch-size must be >= 1 and --workers >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but no GPU is available")
    try:
        args.decode = DecodeConfig(args.beam_size, args.max_length, args.length_penalty, args.no_repeat_ngram_size)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: Optional[Sequence[str]] = None):
    args = parse_args(argv)
    start = time.perf_counter()
    checkpoint = args.checkpoint or str(default_checkpoint())
    try:
        paths = list_images(args.image_dir)
        model = load_model(checkpoint, args.decoder_bin, args.device, args.encoder)
    except (FileNotFoundError, ValueError, KeyError) as error:
        sys.exit(f"error: {error}")
    print(f"{len(paths)} images in {args.image_dir}; model from {checkpoint} "
          f"(encoder {model.encoder.name}, PEFT {'+'.join(model.config.peft) or 'none'}); {args.decode}; "
          f"device {args.device}; loaded in {time.perf_counter() - start:.1f} s")
    if not paths:
        print(f"warning: no .jpg/.jpeg/.png files in {args.image_dir}", file=sys.stderr)
    caption_start = time.perf_counter()
    captions, errors = caption_files(model, paths, args.decode, args.batch_size, args.workers, args.device)
    seconds = time.perf_counter() - caption_start
    for name, message in sorted(errors.items()):
        print(f"warning: could not read {name} ({message}); captioned {FALLBACK_CAPTION!r}", file=sys.stderr)
    predictions = stem_keyed(captions)
    write_json(args.output_json, predictions)
    print(f"wrote {len(predictions)} captions to {args.output_json} ({len(errors)} unreadable files): "
          f"{seconds:.1f} s captioning, {len(paths) / max(seconds, 1e-9):.2f} images/s, "
          f"{time.perf_counter() - start:.1f} s in all")


if __name__ == "__main__":
    main()
