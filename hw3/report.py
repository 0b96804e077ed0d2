"""hw3_report.pdf from result files alone: every number on its pages is read from them.

`build_report(p1_dir, p2_runs, p3_dir, out, toy_world)` is what make_report.py runs; its --help lists the input files.
The toy world, when not given, is the one P3's grounding.json names in its "world" key (no grounding: course data).
Paths on the pages name no machine: `write` and `table` show every absolute path relative to the repository, or
under the cache root as `~/.cache/dlcv-hw3/...` (hw3.common.files.shown_text).
"""
import csv
import datetime
import json
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure  # pages are drawn without pyplot: no display and no global backend needed
from PIL import Image

from hw3.common.errors import UserError
from hw3.common.figures import show_picture
from hw3.common.files import check_writable, read_json, shown_text, write_atomically
from hw3.p1.prompts import REQUIRED_PROMPTS, shown_template
from hw3.p2.peft import PEFT_KINDS
from hw3.toy.world import ToyWorld

REQUIRED = tuple(shown_template(prompt) for prompt in REQUIRED_PROMPTS)  # as accuracy.csv names them
SUMMARY_KEYS = ("method", "trainable_params", "checkpoint_params", "best_epoch", "best", "epochs", "decode", "data",
                "config_file", "finished_at")  # a p2_train.py run's summary.json
ATTENTION_KEYS = ("checkpoint", "checkpoint_sha256", "layer", "layer_reason", "head", "decode", "created_at", "images")
GROUNDING_KEYS = ("table", "best_layer", "words_scored", "words_absent", "images", "split", "world", "world_hash",
                  "checkpoint_sha256", "created_at")
PAGE = (8.27, 11.69)  # A4 portrait, inches
WHY_ZERO_SHOT = (
    "CLIP learns an image encoder and a text encoder jointly on about 400 million image-text pairs from the web, "
    "with a contrastive objective: the embedding of an image must be closer to the embedding of its own caption than "
    "to those of the other captions in a batch of tens of thousands. Natural-language captions name objects, scenes, "
    "attributes, styles and text, so the shared embedding space covers a very open set of visual concepts instead of "
    "a fixed list of class indices. Classification then needs no training: each class name is written into a prompt "
    "(\"a photo of a {object}.\"), the text encoder turns the prompts into classifier weights, and the image is "
    "assigned to the most similar prompt. A ResNet or VGG trained on ImageNet only knows its 1000 output units and "
    "needs new labelled data and fine-tuning for new classes; CLIP's classifier is built from language on the fly, "
    "and its diverse pretraining data makes it robust to distribution shifts. Its weak points follow from the same "
    "recipe: prompts matter (wording close to web captions works best, negations such as \"This is not a photo of\" "
    "are largely ignored by the bag-of-concepts text embedding), and fine-grained or abstract tasks rare on the web "
    "remain hard.")


class ReportError(UserError):
    pass


@dataclass
class World:
    """The toy world the results come from."""
    files: ToyWorld
    manifest: dict  # toyworld.json
    boxes: Optional[dict]  # boxes.json, when there


@dataclass
class Inputs:
    """Every input of the report, read."""
    p1_dir: Path
    p2_runs: Path
    p1: Dict[str, Path]  # p1_clip.py report's files by name
    p1_summary: dict
    accuracy: List[dict]  # accuracy.csv rows
    runs: Dict[str, Path]  # run folder name: run folder (cross-entropy), at least one per PEFT kind
    summaries: Dict[str, dict]  # run folder name: summary.json
    scst: Dict[str, Tuple[dict, Optional[dict]]]  # self-critical run folder name: (its summary, its --init run's)
    val_scores: Optional[dict]
    p3_images: Tuple[Path, dict]  # attention.json of the p3 images, read
    top_last: Tuple[Path, dict]  # attention.json of the top-1/last-1 val images, read
    grounding: Optional[Tuple[Path, dict]]
    world: Optional[World]


def read_csv(path: Path) -> List[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def lacking(path: Path, data: dict, keys) -> List[str]:
    absent = [key for key in keys if key not in data]
    return [f"{path} lacks {absent}"] if absent else []


# ---- inputs -----------------------------------------------------------------------------------------------------

def collect_inputs(p1_dir: Path, p2_runs: Path, p3_dir: Path, toy_world: Optional[Path]) -> Inputs:
    """Every input file, read; raises ReportError listing all missing or malformed inputs at once."""
    missing: List[str] = []

    def need(path: Path, what: str) -> Path:
        if not path.is_file():
            missing.append(f"{path} ({what})")
        return path

    p1 = {name: need(p1_dir / name, "p1_clip.py report output") for name in
          ("summary.json", "accuracy.csv", "top5.png", "top5.json")}
    runs: Dict[str, Path] = {}
    scst: Dict[str, Tuple[dict, Optional[dict]]] = {}
    for summary_path in sorted(p2_runs.glob("*/summary.json")) if p2_runs.is_dir() else []:
        summary = read_json(summary_path)
        method = summary.get("method")
        if summary.get("stage", "xe") == "scst":
            init = Path(summary.get("init") or "").parent / "summary.json"
            scst[summary_path.parent.name] = (summary, read_json(init) if init.is_file() else None)
        elif method in PEFT_KINDS:
            runs[summary_path.parent.name] = summary_path.parent
            need(summary_path.parent / "curves.png", f"{method} training curves")
    missing += [f"{p2_runs}/*/summary.json with method {method!r} (p2_train.py run folder)" for method in PEFT_KINDS
                if not any(read_json(run / "summary.json").get("method") == method for run in runs.values())]
    attention_files = sorted(p3_dir.rglob("attention.json")) if p3_dir.is_dir() else []
    attention = [(path, read_json(path)) for path in attention_files]
    p3_images = [(path, info) for path, info in attention if not any("rank" in r for r in info["images"])]
    top_last = [(path, info) for path, info in attention if any("rank" in r for r in info["images"])]
    if not p3_images:
        missing.append(f"{p3_dir}/**/attention.json of the p3 images (p3_attention.py IMAGE_DIR ...)")
    if not top_last:
        missing.append(f"{p3_dir}/**/attention.json with top-1/last-1 records (p3_attention.py --top-last ...)")
    for path, info in attention:
        for record in info["images"]:
            need(path.parent / Path(record["figure"]).name, "figure named in attention.json")
    grounding_files = sorted(p3_dir.rglob("grounding.json")) if p3_dir.is_dir() else []
    if missing:
        raise ReportError("missing inputs:\n  - " + "\n  - ".join(missing))

    summaries = {name: read_json(run / "summary.json") for name, run in runs.items()}
    grounding = (grounding_files[0], read_json(grounding_files[0])) if grounding_files else None
    malformed = [line for name, run in runs.items()
                 for line in lacking(run / "summary.json", summaries[name], SUMMARY_KEYS)]
    malformed += [line for path, info in attention for line in lacking(path, info, ATTENTION_KEYS)]
    malformed += lacking(*grounding, GROUNDING_KEYS) if grounding else []
    if malformed:
        raise ReportError("malformed inputs:\n  - " + "\n  - ".join(malformed))
    if toy_world is None and grounding is not None:  # only a toy world has boxes to ground words in
        toy_world = Path(grounding[1]["world"])
    world = None
    if toy_world is not None:
        files = ToyWorld(toy_world)
        if not files.manifest_path.is_file():
            raise ReportError(f"missing inputs:\n  - {files.manifest_path} (the toy world the results name)")
        world = World(files, read_json(files.manifest_path), read_json(files.boxes) if files.boxes.is_file() else None)
    scores = p2_runs / "val_scores.json"
    return Inputs(p1_dir, p2_runs, p1, read_json(p1["summary.json"]), read_csv(p1["accuracy.csv"]), runs, summaries,
                  scst, read_json(scores) if scores.is_file() else None, p3_images[0], top_last[0], grounding, world)


# ---- drawing helpers --------------------------------------------------------------------------------------------

def new_page(title: Optional[str] = None) -> Figure:
    figure = Figure(figsize=PAGE)
    if title:
        figure.text(0.06, 0.965, title, fontsize=15, weight="bold", va="top")
    return figure


def write(figure: Figure, y: float, text: str, size: float = 9.5, width: int = 100, **style) -> float:
    """Wrapped text from the top at height y (figure fraction); returns the y below it."""
    paragraphs = shown_text(text).split("\n")  # lines break at spaces only: a path stays whole on its line
    lines = [line for paragraph in paragraphs
             for line in (textwrap.wrap(paragraph, width, break_on_hyphens=False) or [""])]
    figure.text(0.06, y, "\n".join(lines), fontsize=size, va="top", linespacing=1.35, **style)
    return y - len(lines) * size * 1.35 / 72 / PAGE[1] - 0.012


def table(figure: Figure, y: float, header: List[str], rows: List[List[str]], height_per_row: float = 0.022,
          widths: Optional[List[float]] = None, bold_row: Optional[int] = None) -> float:
    height = height_per_row * (len(rows) + 1)
    axis = figure.add_axes([0.06, y - height, 0.88, height])
    axis.axis("off")
    cells = axis.table(cellText=[[shown_text(cell) for cell in row] for row in rows], colLabels=header,
                       loc="upper center", cellLoc="center", colWidths=widths, bbox=[0, 0, 1, 1])
    cells.auto_set_font_size(False)
    cells.set_fontsize(8)
    for (row, _), cell in cells.get_celld().items():
        if row == 0:
            cell.set_text_props(weight="bold", fontsize=7)  # long labels stay inside their column
        elif bold_row is not None and row == bold_row + 1:
            cell.set_text_props(weight="bold")
    return y - height - 0.02


def picture(figure: Figure, path: Path, box: List[float]) -> None:
    """The PNG at `path` fitted into box [left, bottom, width, height] (figure fractions), aspect kept."""
    show_picture(figure.add_axes(box), np.asarray(Image.open(path).convert("RGB")))


def when(path: Path) -> str:
    return datetime.datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec="seconds")


# ---- pages ------------------------------------------------------------------------------------------------------

def cover_page(inputs: Inputs) -> Figure:
    figure = new_page()
    figure.text(0.06, 0.95, "DLCV Fall 2023 - Homework 3 report", fontsize=18, weight="bold", va="top")
    world, summaries = inputs.world, inputs.summaries
    if world:
        manifest = world.manifest
        data = (f"TOY WORLD (toyworld.py, offline synthetic stand-in for hw3_data; not the course data): "
                f"{world.files.root}, generator {manifest.get('generator_version')}, hash {manifest.get('hash')}, "
                f"settings {json.dumps(manifest.get('settings'))}. Its tiny CLIP reaches "
                f"{manifest['clip']['history'][-1]['p1_val_acc']:.3f} zero-shot accuracy on its p1 val set; its "
                f"tiny GPT-2 has val perplexity {manifest['lm']['val_perplexity']:.2f}. Numbers below are toy-world "
                "numbers and are not comparable with the course baselines.")
    else:
        data = "Course data (hw3_data): " + "; ".join(sorted({str(s.get("data")) for s in summaries.values()}))
    p1 = inputs.p1_summary
    p3_path, p3 = inputs.p3_images
    lines = [
        f"Built {datetime.datetime.now().isoformat(timespec='seconds')} by make_report.py from result files only.",
        "", "Data: " + data, "",
        f"P1: CLIP model(s) {', '.join(p1['main_setting']['models'])}; {p1['readable_images']} labelled images; "
        f"device {p1['device']}; results {inputs.p1_dir} (written {when(inputs.p1['summary.json'])}).",
        "P2: " + "; ".join(f"{name}: config {s.get('config_file')}, finished {s.get('finished_at')}"
                            for name, s in summaries.items()) + f"; run folders under {inputs.p2_runs}.",
        f"P3: checkpoint {p3['checkpoint']} (sha256 {p3['checkpoint_sha256'][:16]}...), layer {p3['layer']} "
        f"({p3['layer_reason']}), {'heads averaged' if p3['head'] is None else 'head %d' % p3['head']}, beam size "
        f"{p3['decode']['beam_size']}; figures made {p3['created_at']} ({p3_path.parent}).",
    ]
    if inputs.grounding:
        g_path, g = inputs.grounding
        lines.append(f"Grounding: {g['images']} {g['split']} images of {g['world']} (world hash {g['world_hash']}), "
                     f"checkpoint sha256 {g['checkpoint_sha256'][:16]}..., measured {g['created_at']}.")
    if inputs.val_scores:
        v = inputs.val_scores
        lines.append(f"Submitted captions scored by p2_evaluate.py: {v['num_images']} images of "
                     f"{v['annotation_file']}, CLIPScore with {v['clip_model']}, tokenizer {v['tokenizer']}.")
    write(figure, 0.9, "\n".join(lines), size=10, width=95)
    return figure


def p1_pages(inputs: Inputs) -> List[Figure]:
    figure = new_page("Problem 1: zero-shot classification with CLIP")
    y = write(figure, 0.93, "1. Why CLIP classifies zero-shot", size=11, weight="bold")
    y = write(figure, y, WHY_ZERO_SHOT)
    y = write(figure, y - 0.01, "2. Prompts (accuracy %, without / with horizontal-flip test-time augmentation)",
              size=11, weight="bold")
    merged: Dict[tuple, Dict[str, str]] = {}
    for row in inputs.accuracy:
        key = (row["prompt"], row["templates"], row["synonyms"], row["model"])
        merged.setdefault(key, {})[row["flip"]] = row["accuracy"]
    order = sorted(merged, key=lambda k: (REQUIRED.index(k[0]) if k[0] in REQUIRED else 9))
    rows = [[prompt, templates, synonyms, model, flips.get("no", "-"), flips.get("yes", "-")]
            for (prompt, templates, synonyms, model), flips in ((k, merged[k]) for k in order)]
    y = table(figure, y, ["prompt", "templates", "synonyms", "model", "accuracy", "with flip"], rows,
              widths=[0.38, 0.1, 0.1, 0.22, 0.1, 0.1])
    main = inputs.p1_summary["main_setting"]
    accuracy = {row[0]: float(row[4]) for row in rows if row[0] in REQUIRED}
    positive, negated, no_score = (accuracy.get(p) for p in REQUIRED)
    text = "The three required prompts give " + ", ".join(f"{p!r}: {a:.2f}%" for p, a in accuracy.items()) + ". "
    if None not in (positive, negated, no_score):
        text += (f"The negated prompt scores {'higher' if negated > positive else 'lower'} than the plain one "
                 f"({negated:.2f}% vs {positive:.2f}%): it still contains the class name, and CLIP's text encoder, "
                 "trained on captions that rarely negate, largely ignores the \"not\". \"No {object}, no score.\" "
                 f"is {'the weakest' if no_score < min(positive, negated) else 'not the weakest'} of the three "
                 f"({no_score:.2f}%): it reads like no caption of a photo. ")
    text += (f"The submitted setting is {main['prompt']!r} ({len(main['templates'])} templates, synonyms "
             f"{main['synonyms']}, flip {main['flip']}): {main['accuracy']:.2f}%.")
    write(figure, y, text)
    top5 = new_page("Problem 1: top-5 probabilities of three sampled val images")
    samples = read_json(inputs.p1["top5.json"])
    write(figure=top5, y=0.93, text="Images drawn at random (seed in summary.json): " + "; ".join(
        f"{s['file']} (true: {s['true']}, top-1: {s['top'][0]['label']} {s['top'][0]['probability']:.3f})"
        for s in samples))
    picture(top5, inputs.p1["top5.png"], [0.05, 0.2, 0.9, 0.68])
    return [figure, top5]


def scst_table(figure: Figure, y: float, runs: Dict[str, Tuple[dict, Optional[dict]]]) -> float:
    """Cross-entropy vs the self-critical stage started from it: the val scores of the best epoch of each."""
    def scores(summary: Optional[dict]) -> List[str]:
        if summary is None:
            return ["-", "-", "-"]
        best = summary["best"]
        return [f"{best['CIDEr']:.4f}", f"{best['CLIPScore']:.4f}", f"beam {summary['decode']['beam_size']}"]
    rows = [[name, *scores(xe), *scores(summary)] for name, (summary, xe) in runs.items()]
    y = write(figure, y, "Self-critical stage (p2_train.py --init): the cross-entropy run it started from, then the "
                         "stage's best epoch (validation decoding as shown; hw3_2.sh decodes with beam 3).")
    return table(figure, y, ["SCST run", "XE CIDEr", "XE CLIPScore", "XE val", "SCST CIDEr", "SCST CLIPScore",
                             "SCST val"], rows)


def encoder_name(summary: dict) -> str:
    """The run's frozen encoder, short enough for a table column: a CLIP name, a timm architecture up to its patch
    size with its weights' tag (timm:vit_so400m_patch14_siglip_384.webli -> vit_so400m.webli), or a file's name."""
    encoder = summary.get("encoder") or "-"
    if encoder.startswith("timm:"):
        architecture, _, tag = encoder[len("timm:"):].partition(".")
        return architecture.split("_patch")[0] + (f".{tag.split('@')[0]}" if tag else "")
    return Path(encoder).name if encoder.endswith((".pt", ".pth", ".bin", ".safetensors")) else encoder


def best_run_per_method(summaries: Dict[str, dict]) -> Dict[str, str]:
    """PEFT kind: the name of its run with the best val CIDEr."""
    best: Dict[str, str] = {}
    for name, summary in summaries.items():
        method = summary["method"]
        if method not in best or summary["best"]["CIDEr"] > summaries[best[method]]["best"]["CIDEr"]:
            best[method] = name
    return {method: best[method] for method in PEFT_KINDS}


def p2_pages(inputs: Inputs) -> List[Figure]:
    figure = new_page("Problem 2: PEFT captioning")
    summaries = inputs.summaries
    names = list(summaries)
    best = max(names, key=lambda name: summaries[name]["best"]["CIDEr"])
    rows = [[name, s["method"], encoder_name(s), f"{s['checkpoint_params']:,}", f"{s['trainable_params']:,}",
             str(s["best_epoch"]), f"{s['best']['CIDEr']:.4f}", f"{s['best']['CLIPScore']:.4f}",
             f"beam {s['decode']['beam_size']}"] for name, s in summaries.items()]
    y = write(figure, 0.93, "Validation scores of the best epoch of each run (val CIDEr picks the epoch): one run "
                            "per PEFT method, and any encoder candidates, with the frozen encoder each reads. "
                            "Trainable parameters are counted on the saved checkpoint, which holds only them (the "
                            "limit is < 35M), and while training (prefix tuning may train an MLP that the "
                            "checkpoint stores collapsed).")
    y = table(figure, y, ["run", "method", "encoder", "saved", "trained", "epoch", "CIDEr", "CLIPScore", "decoding"],
              rows, bold_row=names.index(best))
    text = f"Best setting by val CIDEr: {best} ({summaries[best]['best']['CIDEr']:.4f} CIDEr, " \
           f"{summaries[best]['best']['CLIPScore']:.4f} CLIPScore). Config files: " + \
           "; ".join(f"{name}: {s['config_file']}" for name, s in summaries.items()) + "."
    if inputs.val_scores:
        v = inputs.val_scores
        text += (f"\nThe submitted captions (hw3_2.sh) scored by p2_evaluate.py: CIDEr {v['CIDEr']:.4f}, CLIPScore "
                 f"{v['CLIPScore']:.4f} on {v['num_images']} images.")
    y = write(figure, y, text)
    if inputs.scst:
        y = scst_table(figure, y, inputs.scst)
    for name, summary in summaries.items():
        y = write(figure, y, f"{name}: " + ", ".join(
            f"epoch {e['epoch']}: loss {e['train_loss']:.3f}, CIDEr {e['CIDEr']:.3f}, CLIPScore {e['CLIPScore']:.3f}"
            for e in summary["epochs"]), size=8.5, width=120)
    curves = new_page("Problem 2: training curves (loss; val CIDEr and CLIPScore), the best run of each method")
    for index, (method, name) in enumerate(best_run_per_method(summaries).items()):
        curves.text(0.06, 0.92 - index * 0.3, f"{method} ({name})", fontsize=11, weight="bold")
        picture(curves, inputs.runs[name] / "curves.png", [0.05, 0.64 - index * 0.3, 0.9, 0.27])
    return [figure, curves]


def named_pairs(caption: str, boxes: dict) -> List[str]:
    pattern = r"\b(%s) (%s)\b" % ("|".join(boxes["colours"]), "|".join(boxes["shapes"]))
    return [" ".join(m) for m in re.findall(pattern, caption.lower())]


def pair_counts(records: List[dict], world: Optional[World], split: str) -> Optional[tuple]:
    """(pairs named, of them present, objects shown, of them named) over toy-world records; None without boxes."""
    if not world or not world.boxes:
        return None
    named = present = shown = mentioned = 0
    for record in records:
        objects = world.boxes["splits"].get(split, {}).get(Path(record["file"]).name)
        if objects is None:
            return None
        truth = {f"{o['colour']} {o['shape']}" for o in objects["objects"]}
        pairs = named_pairs(record["caption"], world.boxes)
        named, present = named + len(pairs), present + sum(p in truth for p in pairs)
        shown, mentioned = shown + len(truth), mentioned + len(truth & set(pairs))
    return named, present, shown, mentioned


def caption_check(record: dict, world: Optional[World], split: str) -> str:
    """For toy-world images: which named colour-shape pairs are really in the image."""
    if not world or not world.boxes:
        return ""
    objects = world.boxes["splits"].get(split, {}).get(Path(record["file"]).name)
    if objects is None:
        return ""
    present = sorted(f"{o['colour']} {o['shape']}" for o in objects["objects"])
    named = named_pairs(record["caption"], world.boxes)
    right = [p for p in named if p in present]
    wrong = sorted(set(named) - set(present))
    return (f" Objects in the image: {', '.join(present)}; the caption names {len(named)} pair(s), "
            f"{len(right)} of them present{' (wrong: ' + ', '.join(wrong) + ')' if wrong else ''}"
            f"{'' if set(present) <= set(named) else '; missed: ' + ', '.join(p for p in present if p not in named)}.")


def figure_pages(title: str, path: Path, info: dict, world: Optional[World], split: str) -> List[Figure]:
    """The figures at full page width, as many per page as fit; a figure may shrink to 70% to share a page, and one
    taller than a page is scaled down to fit."""
    pages: List[Figure] = []
    y = 0.0
    for record in info["images"]:
        figure_path = path.parent / Path(record["figure"]).name
        width, height = Image.open(figure_path).size
        full_height = 0.92 * PAGE[0] * height / width / PAGE[1]
        if not pages or y - 0.09 < 0.7 * min(full_height, 0.75):
            pages.append(new_page(title))
            y = 0.93
        label = record["name"]
        if "rank" in record:
            label = f"{record['rank']} by CLIPScore: {record['name']} (CLIPScore {record['clip_score']:.4f}, " \
                    f"CIDEr {record['cider']:.4f})"
        y = write(pages[-1], y, f"{label}: \"{record['caption']}\"." + caption_check(record, world, split), size=9)
        fig_height = min(full_height, y - 0.03)
        fig_width = fig_height * width / height * PAGE[1] / PAGE[0]
        picture(pages[-1], figure_path, [0.5 - fig_width / 2, y - fig_height, fig_width, fig_height])
        y -= fig_height + 0.03
    return pages


def p3_analysis_page(inputs: Inputs) -> Figure:
    page = new_page("Problem 3: analysis and grounding")
    p3_path, p3 = inputs.p3_images
    _, top_last = inputs.top_last
    y = 0.93
    cls = np.mean([r["cls_share"] for r in p3["images"]])
    text = (f"How the maps are made: each caption comes from beam search (beam {p3['decode']['beam_size']}); one "
            f"teacher-forced pass of the final caption then records the cross-attention of decoder layer "
            f"{p3['layer']} ({p3['layer_reason']}). Attention is causal, so each word's map is exactly the attention "
            "of the step that chose it. The CLS token is dropped (on the p3 images it received "
            f"{100 * cls:.1f}% of the attention on average), the patch weights are renormalised, mapped back onto "
            "the part of the photo CLIP's resize and centre crop kept, upsampled and scaled to each panel's own "
            "maximum. Words made of several BPE tokens show the mean of their tokens' maps.")
    y = write(page, y, text)
    counts = pair_counts(p3["images"], inputs.world, "p3")
    if counts:
        named, present, shown, mentioned = counts
        y = write(page, y, f"Are the captions reasonable? On the {len(p3['images'])} p3 images the captions name "
                           f"{named} colour-shape pairs, {present} of them really in the image; they mention "
                           f"{mentioned} of the {shown} objects shown (from the toy world's boxes; the figure pages "
                           "list each image's objects).")
    ranks = {r["rank"]: r for r in top_last["images"]}
    y = write(page, y, f"Top-1 val image by CLIPScore: {ranks['top1']['name']} ({ranks['top1']['clip_score']:.4f}) "
                       f"\"{ranks['top1']['caption']}\"; last-1: {ranks['last1']['name']} "
                       f"({ranks['last1']['clip_score']:.4f}) \"{ranks['last1']['caption']}\".")
    if inputs.grounding is None:
        write(page, y, "Grounding: not measured (it needs the toy world's object boxes).")
        return page
    _, g = inputs.grounding
    y = write(page, y - 0.01, "Grounding score per decoder layer", size=11, weight="bold")
    y = write(page, y, f"For every generated word naming a colour or shape of an object in the image "
                       f"({g['words_scored']} words on {g['images']} {g['split']} images; {g['words_absent']} more "
                       "named something absent and are not scored): the share of the word's attention that falls "
                       "inside that object's box, against the share uniform attention would give (baseline).")
    rows = [[str(r["layer"]), str(r["words"]), f"{r['mean_share']:.3f}", f"{r['mean_baseline']:.3f}",
             f"{r['ratio']:.2f}x", f"{r['colour_share']:.3f}", f"{r['shape_share']:.3f}",
             f"{r['best_head']} ({r['best_head_share']:.3f})"] for r in g["table"]]
    best_index = [r["layer"] for r in g["table"]].index(g["best_layer"])
    y = table(page, y, ["layer", "words", "share in box", "baseline", "ratio", "colour words", "shape words",
                        "best head (share)"], rows, bold_row=best_index)
    best = g["table"][best_index]
    verdict = "meets" if best["ratio"] >= 2 else "does NOT meet"
    write(page, y, f"Layer {g['best_layer']} grounds best: {100 * best['mean_share']:.1f}% of a named object's "
                   f"word attention lies in its box, {best['ratio']:.2f}x the uniform baseline of "
                   f"{100 * best['mean_baseline']:.1f}%; it {verdict} the 2x target. The figures use layer "
                   f"{p3['layer']}.")
    return page


def build_report(p1_dir, p2_runs, p3_dir, out, toy_world=None) -> int:
    """Writes the report to `out` (whole, or not at all) and returns its page count; raises ReportError listing the
    missing or malformed inputs."""
    check_writable(out)
    inputs = collect_inputs(Path(p1_dir), Path(p2_runs), Path(p3_dir), Path(toy_world) if toy_world else None)
    p3_path, p3 = inputs.p3_images
    tl_path, tl = inputs.top_last
    pages = [cover_page(inputs)] + p1_pages(inputs) + p2_pages(inputs)
    pages += figure_pages("Problem 3: attention maps of the p3 images", p3_path, p3, inputs.world, "p3")
    pages += figure_pages("Problem 3: top-1 and last-1 val images by CLIPScore", tl_path, tl, inputs.world,
                          "p2_val")
    pages.append(p3_analysis_page(inputs))

    def write_pdf(temporary: str) -> None:
        with PdfPages(temporary, metadata={"Title": "DLCV HW3 report", "Creator": "make_report.py"}) as pdf:
            for page in pages:
                pdf.savefig(page)
    write_atomically(out, write_pdf)
    return len(pages)
