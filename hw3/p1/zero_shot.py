"""Zero-shot image classification with OpenAI CLIP (problem 1). No training of any kind.

Each class is represented by the mean text embedding of its prompts (a template ensemble, CLIP paper section 3.1.4);
an image gets the class whose embedding has the highest cosine similarity with the image's embedding, here the mean
of the embeddings of the image and its mirror image (test-time flip). With several models the similarity logits are
averaged. Text embeddings are computed once per run and model. Images are read by hw3.common.images.open_image.

Defaults, chosen from published results and not tuned on the val set: ViT-L/14 (the strongest OpenAI backbone on
CIFAR-100, whose classes these are; ViT-L/14@336px scores lower there, 74.4% vs 75.8% in open_clip's zero-shot
benchmark), the CLIP paper's 18 CIFAR templates (82.5% vs 81.4% for "a photo of a {object}." on this val set in
public reports), and the mirror-image average. hw3/p1/analysis.py measures every alternative on labelled images.
"""
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import clip
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from hw3.common.clip_models import load_clip
from hw3.common.errors import UserError
from hw3.common.files import check_writable, read_json, write_csv_atomically
from hw3.common.images import ReadableImageFiles, list_image_files
from hw3.p1.prompts import class_names, prompts_for_class, resolve_templates

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


def load_id2label(path: str) -> Dict[str, str]:
    """{class id: class name}, ordered by numeric id when the ids are numbers."""
    id2label = read_json(path, "id2label file")
    if not isinstance(id2label, dict) or not id2label:
        raise UserError(f"{path} must be a non-empty JSON object like {{\"0\": \"bicycle\", ...}}")
    bad = [key for key, name in id2label.items() if not isinstance(name, str) or not name.strip()]
    if bad:
        raise UserError(f"{path}: class name of id {bad[0]!r} is not a non-empty string")
    numeric = all(key.strip().lstrip("-").isdigit() for key in id2label)
    return dict(sorted(id2label.items(), key=lambda item: int(item[0]) if numeric else item[0]))


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
    """Embeddings of every file in `paths` (and of its mirror image with `config.flip`); unreadable files are
    recorded in `errors` instead."""
    device, size = torch.device(config.device), model.visual.input_resolution
    loader = DataLoader(ReadableImageFiles(paths, preprocess, size), batch_size=config.batch_size,
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
    """CSV `filename,label`, whole or not at all, file names exactly as on disk; creates the parent folder."""
    write_csv_atomically(path, ["filename", "label"], zip(filenames, labels))


def predict_folder(image_dir: str, id2label_path: str, output_csv: str, config: ClassifierConfig) -> str:
    """Classifies every file directly in `image_dir` into `output_csv` (`filename,label`, label = class id).
    Unreadable files are left out and reported on stderr. Returns a one-line summary."""
    check_writable(output_csv)
    id2label = load_id2label(id2label_path)
    paths = list_image_files(image_dir)  # by suffix; whether a file decodes is found out when it is read
    if not paths:
        print(f"warning: no files in {image_dir}", file=sys.stderr)
    start = time.perf_counter()
    print(f"{len(paths)} files, {len(id2label)} classes, models {' + '.join(config.models)}, "
          f"templates {config.templates}, flip {config.flip}, device {config.device}")
    logits, ok, errors = classify(paths, list(id2label.values()), config)
    report_skipped(errors)
    class_ids = list(id2label)
    predicted = [class_ids[i] for i in logits[ok].argmax(dim=1).tolist()]
    write_predictions(output_csv, [path.name for path, good in zip(paths, ok.tolist()) if good], predicted)
    seconds = time.perf_counter() - start
    return (f"wrote {len(predicted)} predictions to {output_csv} ({len(errors)} files skipped) "
            f"in {seconds:.1f} s, {len(predicted) / seconds:.1f} images/s")
