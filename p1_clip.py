"""Zero-shot image classification with OpenAI CLIP (DLCV HW3, problem 1). No training of any kind.

    python3 p1_clip.py IMAGE_DIR ID2LABEL OUT_CSV [--model NAME_OR_PATH ...] [--templates SET] ...
    python3 p1_clip.py report IMAGE_DIR ID2LABEL [--out-dir results/p1] ...   (report analyses: see p1_report.py)

Each class is represented by the mean text embedding of its prompts (a template ensemble, CLIP paper section 3.1.4);
an image gets the class whose embedding has the highest cosine similarity with the image's embedding, here the mean
of the embeddings of the image and its mirror image (test-time flip, `--no-flip` turns it off). With several
`--model`s the similarity logits are averaged. Text embeddings are computed once per run and model.

Defaults, chosen from published results and not tuned on the val set: ViT-L/14 (the strongest OpenAI backbone on
CIFAR-100, whose classes these are; ViT-L/14@336px scores lower there, 74.4% vs 75.8% in open_clip's zero-shot
benchmark), the CLIP paper's 18 CIFAR templates (82.5% vs 81.4% for "a photo of a {object}." on this val set in
public reports), and the mirror-image average. `p1_clip.py report` measures every alternative on labelled images.
"""
import argparse
import csv
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import clip
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from clip_models import load_clip
from prompts import class_names, prompts_for_class, resolve_templates

# Accept big photos (PIL's default bomb guard starts warning at 89M pixels); beyond this they are reported as bad.
Image.MAX_IMAGE_PIXELS = 500_000_000
DEFAULT_MODELS = ("ViT-L/14",)


@dataclass
class ClassifierConfig:
    models: Sequence[str] = DEFAULT_MODELS  # OpenAI CLIP names or state_dict paths; logits are averaged
    templates: str = "cifar18"  # a prompts.TEMPLATE_SETS name or one template with {object}
    synonyms: bool = False  # add prompts.CIFAR_SYNONYMS names for ambiguous class names
    flip: bool = True  # average the embeddings of the image and its mirror image
    batch_size: int = 64
    num_workers: int = min(4, os.cpu_count() or 1)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


class InputError(ValueError):
    """Bad input from the command line (missing folder, unreadable id2label, ...)."""


def load_id2label(path: str) -> Dict[str, str]:
    """{class id: class name}, ordered by numeric id when the ids are numbers."""
    try:
        with open(path, encoding="utf-8") as file:
            id2label = json.load(file)
    except FileNotFoundError:
        raise InputError(f"id2label file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read {path} as JSON ({error})") from None
    if not isinstance(id2label, dict) or not id2label:
        raise InputError(f"{path} must be a non-empty JSON object like {{\"0\": \"bicycle\", ...}}")
    bad = [key for key, name in id2label.items() if not isinstance(name, str) or not name.strip()]
    if bad:
        raise InputError(f"{path}: class name of id {bad[0]!r} is not a non-empty string")
    numeric = all(key.strip().lstrip("-").isdigit() for key in id2label)
    return dict(sorted(id2label.items(), key=lambda item: int(item[0]) if numeric else item[0]))


def list_image_files(folder: str) -> List[Path]:
    """Every regular file directly in `folder`, by name; those that are not readable images are skipped later."""
    if not os.path.isdir(folder):
        raise InputError(f"image folder not found: {folder}")
    return sorted(path for path in Path(folder).iterdir() if path.is_file())


def open_image(path: Path, size: int) -> Image.Image:
    """An RGB image from any PIL-readable file: EXIF-rotated, transparency on white, 16-bit scaled to 8-bit."""
    image = Image.open(path)
    if image.format == "JPEG":
        image.draft("RGB", (size, size))  # decode big JPEGs at a reduced scale that still covers `size`
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16/32-bit grey: convert("RGB") would clip
        array = np.asarray(image, dtype=np.float32)
        scale = 255 / 65535 if array.max() > 255 else 1.0
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image.alpha_composite(rgba)
    image = image.convert("RGB")
    shrink = min(image.size) // (4 * size)
    if shrink >= 2:  # box-average huge images first: same picture, much faster bicubic resize afterwards
        image = image.reduce(shrink)
    return image


class ImageFiles(Dataset):
    """(preprocessed image, index, error message); an unreadable file gives a blank image and its error."""

    def __init__(self, paths: Sequence[Path], preprocess, size: int):
        self.paths, self.preprocess, self.size = list(paths), preprocess, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. PIL's palette/bomb warnings: the image is still fine
                return self.preprocess(open_image(self.paths[index], self.size)), index, ""
        except Exception as error:  # any failure (corrupt, truncated, not an image) skips this file only
            return torch.zeros(3, self.size, self.size), index, f"{type(error).__name__}: {error}"


@dataclass
class ImageFeatures:
    """Unit-norm image embeddings of one model (rows of unreadable files stay zero, `ok` is False there)."""
    plain: torch.Tensor  # [N, D]
    flipped: Optional[torch.Tensor]  # [N, D] embeddings of the mirror images, when computed
    ok: torch.Tensor  # [N] bool
    errors: Dict[str, str] = field(default_factory=dict)  # file name -> why it was skipped
    seconds: float = 0.0  # wall time of the pass, data loading included
    flip_seconds: float = 0.0  # the part of it spent encoding mirror images

    def embeddings(self, flip: bool) -> torch.Tensor:
        if not flip:
            return self.plain
        if self.flipped is None:
            raise ValueError("mirror-image embeddings were not computed")
        return F.normalize(self.plain + self.flipped, dim=-1)


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def encode_images(model, preprocess, paths: Sequence[Path], config: ClassifierConfig, desc: str) -> ImageFeatures:
    device, size = torch.device(config.device), model.visual.input_resolution
    loader = DataLoader(ImageFiles(paths, preprocess, size), batch_size=config.batch_size,
                        num_workers=config.num_workers, pin_memory=device.type == "cuda")
    dim = model.text_projection.shape[1]
    plain = torch.zeros(len(paths), dim)
    flipped = torch.zeros(len(paths), dim) if config.flip else None
    result = ImageFeatures(plain, flipped, torch.zeros(len(paths), dtype=torch.bool))
    start = time.perf_counter()
    for images, indices, messages in tqdm(loader, desc=desc, unit="batch"):
        readable = torch.tensor([not message for message in messages])
        for index, message in zip(indices.tolist(), messages):
            if message:
                result.errors[paths[index].name] = message
        if not readable.any():
            continue
        indices, images = indices[readable], images[readable].to(device, model.dtype, non_blocking=True)
        plain[indices] = F.normalize(model.encode_image(images).float(), dim=-1).cpu()
        result.ok[indices] = True
        if flipped is not None:
            synchronize(device)
            flip_start = time.perf_counter()
            flipped[indices] = F.normalize(model.encode_image(images.flip(-1)).float(), dim=-1).cpu()
            result.flip_seconds += time.perf_counter() - flip_start
    result.seconds = time.perf_counter() - start
    return result


@torch.no_grad()
def encode_classes(model, names: Sequence[Sequence[str]], templates: Sequence[str], device: str,
                   batch_size: int = 256) -> torch.Tensor:
    """[C, D] unit-norm class embeddings: the renormalised mean of the unit-norm embeddings of each class's prompts."""
    texts = [prompts_for_class(class_names_, templates) for class_names_ in names]
    flat = [text for class_texts in texts for text in class_texts]
    tokens = clip.tokenize(flat, context_length=model.context_length, truncate=True)
    embeddings = torch.cat([
        F.normalize(model.encode_text(tokens[i:i + batch_size].to(device)).float(), dim=-1).cpu()
        for i in range(0, len(flat), batch_size)
    ])
    per_class = torch.split(embeddings, [len(class_texts) for class_texts in texts])
    return F.normalize(torch.stack([class_embeddings.mean(0) for class_embeddings in per_class]), dim=-1)


def logit_scale(model) -> float:
    return model.logit_scale.exp().item()


def report_skipped(errors: Dict[str, str]):
    for name, message in sorted(errors.items()):
        print(f"warning: skipped {name}: {message}", file=sys.stderr)


def classify(paths: Sequence[Path], labels: Sequence[str],
             config: ClassifierConfig) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, str]]:
    """(logits [N, C] averaged over the models, readable mask [N], skipped files)."""
    if not paths:
        return torch.zeros(0, len(labels)), torch.zeros(0, dtype=torch.bool), {}
    names = class_names(labels, config.synonyms)
    templates = resolve_templates(config.templates)
    logits, features = torch.zeros(len(paths), len(labels)), None
    for name in config.models:
        model, preprocess = load_clip(name, config.device)
        classes = encode_classes(model, names, templates, config.device)
        features = encode_images(model, preprocess, paths, config, desc=f"CLIP {Path(name).name}")
        readable = int(features.ok.sum())
        print(f"{name}: encoded {readable} images in {features.seconds:.1f} s "
              f"({readable / max(features.seconds, 1e-9):.1f} images/s{', with mirror images' if config.flip else ''})")
        logits += logit_scale(model) * features.embeddings(config.flip) @ classes.T / len(config.models)
        del model
        if config.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return logits, features.ok, features.errors


def write_predictions(path: str, filenames: Sequence[str], labels: Sequence[str]):
    """CSV `filename,label`; creates the parent folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["filename", "label"])
        writer.writerows(zip(filenames, labels))


def add_classifier_options(parser: argparse.ArgumentParser):
    default = ClassifierConfig()
    parser.add_argument("--model", dest="models", action="append", metavar="NAME_OR_PATH",
                        help="OpenAI CLIP name (e.g. ViT-L/14, ViT-L/14@336px) or a state_dict file; repeat for a "
                             f"backbone ensemble (default: {' + '.join(DEFAULT_MODELS)})")
    parser.add_argument("--templates", default=default.templates,
                        help="prompt template set: photo, cifar18, imagenet7, imagenet80, cifar18+imagenet80, or one "
                             "template such as 'a photo of a {object}.' (default: %(default)s)")
    parser.add_argument("--synonyms", action="store_true", help="also prompt with synonyms of ambiguous class names")
    parser.add_argument("--no-flip", dest="flip", action="store_false", help="no mirror-image test-time averaging")
    parser.add_argument("--batch-size", type=int, default=default.batch_size, help="images per batch (%(default)s)")
    parser.add_argument("--workers", dest="num_workers", type=int, default=default.num_workers,
                        help="image-loading worker processes (default: %(default)s)")
    parser.add_argument("--device", default=default.device, help="cuda or cpu (default: %(default)s)")


def config_from_args(args: argparse.Namespace) -> ClassifierConfig:
    if args.batch_size < 1 or args.num_workers < 0:
        raise InputError("--batch-size must be >= 1 and --workers >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but no GPU is available")
    resolve_templates(args.templates)  # fail early on a bad template
    return ClassifierConfig(models=tuple(args.models or DEFAULT_MODELS), templates=args.templates,
                            synonyms=args.synonyms, flip=args.flip, batch_size=args.batch_size,
                            num_workers=args.num_workers, device=args.device)


def predict_main(argv: Sequence[str]):
    parser = argparse.ArgumentParser(
        description="Zero-shot CLIP classification of every image in a folder -> CSV `filename,label`. "
                    "Run `python3 p1_clip.py report --help` for the report analyses.")
    parser.add_argument("image_dir", help="folder of images (.png/.jpg/...; any file names)")
    parser.add_argument("id2label", help="JSON mapping class id -> class name")
    parser.add_argument("output_csv", help="where to write the predictions (parent folders are created)")
    add_classifier_options(parser)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        id2label = load_id2label(args.id2label)
        paths = list_image_files(args.image_dir)
    except (InputError, ValueError) as error:
        parser.error(str(error))

    if not paths:
        print(f"warning: no files in {args.image_dir}", file=sys.stderr)
    start = time.perf_counter()
    print(f"{len(paths)} files, {len(id2label)} classes, models {' + '.join(config.models)}, "
          f"templates {config.templates}, flip {config.flip}, device {config.device}")
    logits, ok, errors = classify(paths, list(id2label.values()), config)
    report_skipped(errors)
    class_ids = list(id2label)
    predicted = [class_ids[i] for i in logits[ok].argmax(dim=1).tolist()]
    write_predictions(args.output_csv, [path.name for path, good in zip(paths, ok.tolist()) if good], predicted)
    seconds = time.perf_counter() - start
    print(f"wrote {len(predicted)} predictions to {args.output_csv} ({len(errors)} files skipped) "
          f"in {seconds:.1f} s, {len(predicted) / seconds:.1f} images/s")


def main(argv: Optional[Sequence[str]] = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["report"]:
        from p1_report import report_main
        report_main(argv[1:])
    else:
        predict_main(argv)


if __name__ == "__main__":
    main()
