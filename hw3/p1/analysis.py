"""Report analyses for problem 1 on labelled images: `write_report`, behind `python3 p1_clip.py report`.

Needs labelled file names (`{class_id}_{image_id}.png`, as in p1_data/val). Image embeddings are computed once per
model (with their mirror images); every prompt setting then costs only its text embeddings. Writes, under the
output folder (--out-dir):

  accuracy.csv / accuracy.md  accuracy of every prompt setting x model (each, and their ensemble) x flip, with the
                              seconds spent encoding images and texts
  predictions.csv             filename, label, predicted, correct: the main setting (the classifier options given)
  per_class.csv               accuracy of each class under the main setting, worst first
  confusions.csv              the most frequent (true class -> predicted class) mistakes of the main setting
  confusion_matrix.csv        rows true class, columns predicted class (counts)
  top5.png / top5.json        top-5 class probabilities of --samples images drawn with --seed
  analysis.md                 the main setting's accuracy, worst classes and most confused pairs
  summary.json                settings, device, skipped files and the paths above
"""
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from hw3.common.clip_models import load_clip  # noqa: E402
from hw3.common.errors import UserError  # noqa: E402
from hw3.common.files import (check_writable, write_atomically, write_csv_atomically,  # noqa: E402
                              write_json_atomically, write_text_atomically)
from hw3.common.figures import show_picture  # noqa: E402
from hw3.common.images import list_image_files, open_image  # noqa: E402
from hw3.p1.prompts import (ENSEMBLE_SETS, PHOTO_PROMPT, REQUIRED_PROMPTS, TEMPLATE_SETS, class_names,  # noqa: E402
                            clean_class_name, resolve_templates, shown_template)
from hw3.p1.zero_shot import (ClassifierConfig, ImageFeatures, encode_classes, encode_images,  # noqa: E402
                              load_id2label, logit_scale, report_skipped)


@dataclass(frozen=True)
class Setting:
    name: str  # a template set name, or the template itself written with {object}
    templates: Tuple[str, ...]
    synonyms: bool = False


def report_settings(ensembles: Sequence[str] = ENSEMBLE_SETS) -> List[Setting]:
    """The three required prompts, CLIP's default prompt, then each ensemble with and without synonyms."""
    singles = [Setting(shown_template(t), (t,)) for t in REQUIRED_PROMPTS + (PHOTO_PROMPT,)]
    ensembles = [Setting(name, TEMPLATE_SETS[name], synonyms) for name in ensembles for synonyms in (False, True)]
    return singles + ensembles


def main_setting(templates: str, synonyms: bool) -> Setting:
    resolved = resolve_templates(templates)
    name = templates if templates in TEMPLATE_SETS else shown_template(resolved[0])
    return Setting(name, resolved, synonyms)


def labelled_files(paths: Sequence[Path], class_ids: Sequence[str]) -> Tuple[List[Path], List[int]]:
    """Files named `{class_id}_...` and their class indices; others are left out with a warning."""
    index_of = {str(int(c)) if c.strip().lstrip("-").isdigit() else c: i for i, c in enumerate(class_ids)}
    kept, targets = [], []
    for path in paths:
        prefix = path.name.split("_", 1)[0]
        key = str(int(prefix)) if prefix.lstrip("-").isdigit() else prefix
        if "_" in path.name and key in index_of:
            kept.append(path)
            targets.append(index_of[key])
        else:
            print(f"warning: {path.name} does not start with a class id and '_': left out of the report",
                  file=sys.stderr)
    if not kept:
        raise UserError("the report needs labelled file names like 3_12.png (class id, underscore, image id)")
    return kept, targets


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_top5(out_path: Path, samples: Sequence[Path], probabilities: torch.Tensor, targets: Sequence[int],
              labels: Sequence[str], top_k: int = 5) -> List[dict]:
    """One row per sample: the image, then a bar chart of its top-k class probabilities (true class in green)."""
    figure, axes = plt.subplots(len(samples), 2, figsize=(7.5, 2.1 * len(samples) + 0.3), squeeze=False,
                                gridspec_kw={"width_ratios": [1, 2.4]})
    names = [clean_class_name(label) for label in labels]
    records = []
    for (image_axis, bar_axis), path, probs, target in zip(axes, samples, probabilities, targets):
        top = probs.topk(min(top_k, len(labels)))
        indices, values = top.indices.tolist(), top.values.tolist()
        records.append({"file": path.name, "true": labels[target],
                        "top": [{"label": labels[i], "probability": round(p, 5)} for i, p in zip(indices, values)]})
        image = open_image(path)
        image.thumbnail((512, 512))  # plenty for a 2-inch panel, and a small PNG
        show_picture(image_axis, np.asarray(image), interpolation="nearest")
        rows = list(range(len(indices)))[::-1]  # best on top
        bar_axis.barh(rows, values, color=["tab:green" if i == target else "tab:gray" for i in indices])
        bar_axis.set_yticks(rows)
        bar_axis.set_yticklabels([names[i] for i in indices], fontsize=9)
        bar_axis.set_xlim(0, 1)
        bar_axis.set_title(f"{path.name}   (true class: {names[target]})", fontsize=9)
        for y, p in zip(rows, values):
            bar_axis.text(min(p, 0.85) + 0.01, y, f"{p:.3f}", va="center", fontsize=8)
    axes[-1][1].set_xlabel("probability (softmax over the classes)", fontsize=9)
    figure.tight_layout()
    write_atomically(out_path, lambda path: figure.savefig(path, dpi=150, format="png"))
    plt.close(figure)
    return records


@dataclass
class ModelRun:
    """One backbone's image embeddings and, per prompt setting, its class embeddings and their cost."""
    name: str
    features: ImageFeatures
    scale: float  # CLIP's learned logit scale (100 for the released models)
    classes: Dict[Setting, torch.Tensor]
    text_seconds: Dict[Setting, float]

    def logits(self, setting: Setting, flip: bool) -> torch.Tensor:
        return self.scale * self.features.embeddings(flip) @ self.classes[setting].T


def run_models(paths: Sequence[Path], labels: Sequence[str], settings: Sequence[Setting],
               config: ClassifierConfig) -> List[ModelRun]:
    runs = []
    for name in config.models:
        model, preprocess = load_clip(name, config.device)
        classes, text_seconds = {}, {}
        for setting in tqdm(settings, desc="prompt settings", unit="setting"):
            start = time.perf_counter()
            names = class_names(labels, setting.synonyms)
            classes[setting] = encode_classes(model, names, setting.templates, config.device)
            text_seconds[setting] = time.perf_counter() - start
        features = encode_images(model, preprocess, paths, replace(config, flip=True), desc=f"CLIP {display(name)}")
        runs.append(ModelRun(display(name), features, logit_scale(model), classes, text_seconds))
        del model
        if config.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return runs


def display(model_name: str) -> str:
    return Path(model_name).name if "/" in model_name and Path(model_name).exists() else model_name


def ensemble_logits(runs: Sequence[ModelRun], setting: Setting, flip: bool) -> torch.Tensor:
    return sum(run.logits(setting, flip) for run in runs) / len(runs)


ACCURACY_HEADER = ["prompt", "templates", "synonyms", "model", "flip", "accuracy", "correct", "images",
                   "image_seconds", "text_seconds"]


def accuracy_rows(runs: Sequence[ModelRun], settings: Sequence[Setting], targets: torch.Tensor,
                  ok: torch.Tensor) -> List[list]:
    """Every setting x model subset (each model, and all of them when there are several) x flip off/on."""
    subsets = [[run] for run in runs] + ([list(runs)] if len(runs) > 1 else [])
    rows = []
    for setting in settings:
        for subset in subsets:
            for flip in (False, True):
                correct = (ensemble_logits(subset, setting, flip).argmax(1) == targets)[ok]
                image_seconds = sum(r.features.seconds - (0 if flip else r.features.flip_seconds) for r in subset)
                rows.append([setting.name, len(setting.templates), yes_no(setting.synonyms),
                             " + ".join(r.name for r in subset), yes_no(flip),
                             f"{100 * correct.float().mean().item():.2f}", int(correct.sum()), int(ok.sum()),
                             f"{image_seconds:.2f}", f"{sum(r.text_seconds[setting] for r in subset):.2f}"])
    return rows


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def class_analysis(predicted: np.ndarray, targets: np.ndarray, labels: Sequence[str], class_ids: Sequence[str],
                   top_confusions: int):
    """(per-class rows worst first, most confused pairs, confusion matrix) of readable images."""
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(matrix, (targets, predicted), 1)
    totals = matrix.sum(1)
    per_class = [[class_ids[c], labels[c], int(totals[c]), int(matrix[c, c]),
                  f"{100 * matrix[c, c] / totals[c]:.2f}" if totals[c] else ""] for c in range(len(labels))]
    per_class.sort(key=lambda row: (float(row[4]) if row[4] else 101.0, row[0]))
    mistakes = [(int(matrix[t, p]), t, p) for t in range(len(labels)) for p in range(len(labels))
                if t != p and matrix[t, p]]
    mistakes.sort(key=lambda m: (-m[0], m[1], m[2]))
    confusions = [[class_ids[t], labels[t], class_ids[p], labels[p], count, f"{100 * count / totals[t]:.2f}"]
                  for count, t, p in mistakes[:top_confusions]]
    return per_class, confusions, matrix


PER_CLASS_HEADER = ["class_id", "class_name", "images", "correct", "accuracy"]
CONFUSION_HEADER = ["true_id", "true_name", "predicted_id", "predicted_name", "count", "percent_of_true_class"]
REPORT_FILES = ("accuracy.csv", "accuracy.md", "predictions.csv", "per_class.csv", "confusions.csv",
                "confusion_matrix.csv", "top5.png", "top5.json", "analysis.md", "summary.json")


def write_accuracy_tables(files: Dict[str, Path], rows: List[list], images: int, image_dir: str,
                          device: str) -> None:
    """accuracy.csv and accuracy.md: every prompt setting x model x flip (accuracy_rows)."""
    write_csv_atomically(files["accuracy.csv"], ACCURACY_HEADER, rows)
    write_text_atomically(
        files["accuracy.md"],
        f"Zero-shot accuracy on {images} images of {image_dir} (device {device}). image_seconds: "
        "encoding the images (data loading included; with flip, the mirror images too); text_seconds: encoding "
        "that setting's prompts.\n\n" + markdown_table(ACCURACY_HEADER, rows))


def write_class_tables(files: Dict[str, Path], paths: Sequence[Path], targets: Sequence[int], predicted: torch.Tensor,
                       ok: torch.Tensor, class_ids: Sequence[str], labels: Sequence[str],
                       top_confusions: int) -> Tuple[List[list], List[list]]:
    """predictions.csv, per_class.csv, confusions.csv and confusion_matrix.csv of the main setting's predictions
    (readable images only); returns (per-class rows worst first, most confused pairs)."""
    readable = ok.nonzero().flatten().tolist()
    write_csv_atomically(files["predictions.csv"], ["filename", "label", "predicted", "correct"],
                         [[paths[i].name, class_ids[targets[i]], class_ids[predicted[i]],
                           yes_no(predicted[i] == targets[i])] for i in readable])
    per_class, confusions, matrix = class_analysis(predicted[ok].numpy(), torch.tensor(targets)[ok].numpy(), labels,
                                                   class_ids, top_confusions)
    write_csv_atomically(files["per_class.csv"], PER_CLASS_HEADER, per_class)
    write_csv_atomically(files["confusions.csv"], CONFUSION_HEADER, confusions)
    write_csv_atomically(files["confusion_matrix.csv"], ["true \\ predicted"] + list(class_ids),
                         [[class_ids[c]] + matrix[c].tolist() for c in range(len(labels))])
    return per_class, confusions


def write_report(image_dir: str, id2label_path: str, config: ClassifierConfig, out_dir: str, samples: int = 3,
                 seed: int = 0, ensembles: Sequence[str] = ENSEMBLE_SETS, top_confusions: int = 20) -> List[str]:
    """Writes the report files (module docstring) for the labelled images in `image_dir` under `out_dir`; the main
    setting is `config`'s. Returns the lines that sum it up: the main setting's accuracy, then each file written."""
    id2label = load_id2label(id2label_path)
    class_ids, labels = list(id2label), list(id2label.values())
    paths, targets = labelled_files(list_image_files(image_dir), class_ids)
    main = main_setting(config.templates, config.synonyms)
    settings = report_settings(ensembles)
    settings += [main] if main not in settings else []
    out_dir = Path(out_dir)
    check_writable(out_dir, "folder")
    print(f"report on {len(paths)} labelled images, {len(settings)} prompt settings, models "
          f"{' + '.join(config.models)}, device {config.device}")

    runs = run_models(paths, labels, settings, config)
    ok, errors = runs[-1].features.ok, runs[-1].features.errors
    report_skipped(errors)
    if not ok.any():
        raise UserError(f"none of the {len(paths)} labelled files in {image_dir} is a readable image")
    targets_tensor = torch.tensor(targets)
    files = {name: out_dir / name for name in REPORT_FILES}
    write_accuracy_tables(files, accuracy_rows(runs, settings, targets_tensor, ok), int(ok.sum()), image_dir,
                          config.device)
    logits = ensemble_logits(runs, main, config.flip)
    predicted = logits.argmax(1)
    readable = ok.nonzero().flatten().tolist()
    per_class, confusions = write_class_tables(files, paths, targets, predicted, ok, class_ids, labels, top_confusions)

    drawn = sorted(random.Random(seed).sample(readable, min(samples, len(readable))))
    top5 = plot_top5(files["top5.png"], [paths[i] for i in drawn], logits[drawn].softmax(-1),
                     [targets[i] for i in drawn], labels)
    write_json_atomically(files["top5.json"], top5, indent=2)

    accuracy = 100 * (predicted == targets_tensor)[ok].float().mean().item()
    main_description = (f"prompt `{main.name}` ({len(main.templates)} templates), synonyms {yes_no(main.synonyms)}, "
                        f"models {' + '.join(r.name for r in runs)}, flip {yes_no(config.flip)}")
    write_text_atomically(
        files["analysis.md"],
        f"Main setting: {main_description}: accuracy {accuracy:.2f}% on {len(readable)} images.\n\n"
        "Worst classes:\n\n" + markdown_table(PER_CLASS_HEADER, per_class[:10])
        + "\nMost confused pairs (true -> predicted):\n\n" + markdown_table(CONFUSION_HEADER, confusions[:10]))
    summary = {"main_setting": {"prompt": main.name, "templates": list(main.templates), "synonyms": main.synonyms,
                                "models": list(config.models), "flip": config.flip, "accuracy": accuracy},
               "images": len(paths), "readable_images": len(readable), "skipped": errors, "device": config.device,
               "seed": seed, "samples": [paths[i].name for i in drawn],
               "files": {name: str(path) for name, path in files.items()}}
    write_json_atomically(files["summary.json"], summary, indent=2)
    return [f"main setting: {main_description}: accuracy {accuracy:.2f}%"] + [f"wrote {p}" for p in files.values()]
