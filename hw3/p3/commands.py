"""The two jobs of p3_attention.py, printing what they do as the command line shows it.

    draw_figures("hw3_data/p3_data/images", Captioner(decoder="decoder_model.bin"))   # PNGs + attention.json
    measure_grounding(Boxes(boxes_json, "p3", images, source), Captioner(...))       # grounding.csv / .json

Figures: one PNG per image (the course's layout, hw3.p3.attention) and attention.json (captions, words, settings),
for every image of a folder or for the top-1 and last-1 images by CLIPScore of p2_evaluate.py's per-image CSV.
Grounding: hw3.p3.grounding's per-layer table over one split of images with known object boxes (the caller reads
them, e.g. p3_attention.py from a toy world), and its best layer, which the figures' `layer="auto"` then uses.
"""
import csv
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from tqdm import tqdm

from hw3.common.errors import UserError
from hw3.common.files import (check_writable, read_json, sha256_file, write_atomically, write_csv_atomically,
                              write_json_atomically)
from hw3.common.images import list_image_files, open_image
from hw3.common.layout import CourseLayout
from hw3.common.manifest import checkpoint_path
from hw3.p2.checkpoint import load_captioner
from hw3.p2.generation import DecodeConfig, clean_caption
from hw3.p2.model import CaptionModel
from hw3.p3 import grounding
from hw3.p3.attention import (caption_images, caption_words, cross_attention_layers, peak_region,
                               plot_caption_attention, word_maps)
from tokenizer import BPETokenizer

CSV_COLUMNS = ("file_name", "caption", "cider", "clip_score")  # p2_evaluate.py --per-image-csv
GROUNDING_SPLITS = ("p2_val", "p3", "p2_train")  # the boxes.json splits with captioned scenes

Selection = List[Tuple[Path, dict]]  # image path, extra fields of its attention.json record


@dataclass
class Captioner:
    """The trained captioner to load and how to decode with it."""
    checkpoint: Optional[str] = None  # None: checkpoints.json's p2_best, sha256-verified (hw3_download.sh fetches it)
    decoder: Optional[str] = None  # the course's decoder_model.bin
    encoder: Optional[str] = None  # None: the checkpoint's image encoder
    device: Optional[str] = None  # None: cuda when available
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    batch_size: int = 16  # images per batch

    def checkpoint_file(self) -> str:
        return self.checkpoint or str(checkpoint_path())

    def load(self) -> CaptionModel:
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return load_captioner(self.checkpoint, self.decoder, device, encoder=self.encoder)  # None: the published one


# ---- which images, which layer ----------------------------------------------------------------------------------

def caption_image_files(folder) -> List[Path]:
    """The image files directly in `folder` (hw3.common.images.list_image_files), by name; a UserError when there
    are none."""
    paths = list_image_files(folder)
    if not paths:
        raise UserError(f"no image files in {folder}")
    return paths


def top_and_last(csv_path: str, folder) -> Selection:
    """The rows of the highest and the lowest CLIPScore in p2_evaluate.py's per-image CSV, with their image paths."""
    if not Path(csv_path).is_file():
        raise UserError(f"per-image CSV not found: {csv_path}")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{csv_path} lacks columns {missing} (expected p2_evaluate.py --per-image-csv output "
                            f"with {list(CSV_COLUMNS)})")
        rows = list(reader)
    if not rows:
        raise UserError(f"{csv_path} has no rows")
    try:
        for row in rows:
            row["clip_score"], row["cider"] = float(row["clip_score"]), float(row["cider"])
    except ValueError as error:
        raise UserError(f"{csv_path}: a clip_score or cider that is not a number ({error})") from None
    ranked = sorted(rows, key=lambda row: -row["clip_score"])
    selection = []
    for rank, row in (("top1", ranked[0]), ("last1", ranked[-1])):
        path = Path(folder) / row["file_name"]
        if not path.is_file():
            raise UserError(f"{row['file_name']} (from {csv_path}) is not in {folder}")
        selection.append((path, {"rank": rank, "clip_score": row["clip_score"], "cider": row["cider"],
                                 "scored_caption": row["caption"]}))
    return selection


def choose_layer(choice: str, layers: List[int], grounding_json: Optional[str], checkpoint: str) -> Tuple[int, str]:
    """(layer, why) for `choice` auto|last|N; auto takes the best layer of `grounding_json` (measured for the same
    checkpoint), else the last cross-attention layer."""
    if choice == "last":
        return layers[-1], "the last cross-attention layer (--layer last)"
    if choice != "auto":
        if not choice.lstrip("-").isdigit() or int(choice) not in layers:
            raise UserError(f"--layer {choice}: give auto, last or one of the cross-attention layers {layers}")
        return int(choice), "given with --layer"
    if not grounding_json:
        return layers[-1], "the last cross-attention layer (no --grounding measurement given)"
    measured = read_json(grounding_json, "grounding.json (p3_attention.py grounding)")
    if measured.get("checkpoint_sha256") != sha256_file(checkpoint):
        raise UserError(f"{grounding_json} was measured for another checkpoint ({measured.get('checkpoint')}); "
                        "measure this one with `p3_attention.py grounding` or pass --layer")
    if measured.get("best_layer") not in layers:
        raise UserError(f"{grounding_json} names no usable best layer ({measured.get('best_layer')})")
    return measured["best_layer"], f"best grounding layer measured in {grounding_json}"


# ---- the two jobs -----------------------------------------------------------------------------------------------

def draw_figures(images, captioner: Captioner, out_dir="results/p3", top_last: Optional[str] = None,
                 layer: str = "auto", head: Optional[int] = None, grounding_json: Optional[str] = None,
                 merge_subwords: bool = True) -> dict:
    """Captions the images of folder `images` (with `top_last`: only the CSV's top-1 and last-1, saved as
    top1_NAME.png / last1_NAME.png), draws each caption's attention at `layer` (see choose_layer) and `head` (None:
    the heads' mean), and writes the PNGs and attention.json into `out_dir`. Returns attention.json's content."""
    check_writable(out_dir, "folder")
    selection = top_and_last(top_last, images) if top_last else [(path, {}) for path in caption_image_files(images)]
    model = captioner.load()
    checkpoint = captioner.checkpoint_file()
    layer, why = choose_layer(layer, cross_attention_layers(model), grounding_json, checkpoint)
    print(f"layer {layer}: {why}; {'heads averaged' if head is None else f'head {head}'}")

    tokenizer, out_dir = BPETokenizer(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pictures = [open_image(path) for path, _ in selection]
    with tqdm(total=len(pictures), desc="captioning") as progress:
        results = caption_images(model, pictures, captioner.decode, [path.stem for path, _ in selection],
                                 captioner.batch_size, progress)
    records = []
    for (path, extra), result in zip(selection, results):
        caption = clean_caption(tokenizer.decode(result.token_ids))
        prefix, title = "", None
        if extra:
            prefix = f"{extra['rank']}_"
            title = f"{extra['rank']}: {path.name}, CLIPScore {extra['clip_score']:.4f}\n\"{caption}\""
        figure = plot_caption_attention(result, tokenizer, layer, head, merge_subwords, title=title)
        figure_path = out_dir / f"{prefix}{path.stem}.png"
        write_atomically(figure_path, lambda path: figure.savefig(path, dpi=110, format="png"))
        words = caption_words(result, tokenizer, merge_subwords)
        peaks = [[word, peak_region(grid)] for word, grid in word_maps(result, words, layer, head)[:len(words)]]
        records.append({"name": path.stem, "file": str(path), "figure": str(figure_path), "caption": caption,
                        "tokens": result.token_ids, "words": [w for w, _ in words], "peaks": peaks,
                        "ended": result.ended,
                        "cls_share": float(result.prefix_share[layer].mean()), **extra})
        if extra and caption != extra["scored_caption"]:
            print(f"note: {path.name}: caption {caption!r} differs from the scored one {extra['scored_caption']!r} "
                  "(another checkpoint or decoding settings?)")
    info = {"checkpoint": checkpoint, "checkpoint_sha256": sha256_file(checkpoint), "layer": layer,
            "layer_reason": why, "head": head, "decode": asdict(captioner.decode), "per_image_csv": top_last,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "images": records}
    write_json_atomically(out_dir / "attention.json", info, indent=2)
    for record in records:
        print(f"wrote {record['figure']}: {record['caption']!r}")
    print(f"wrote {out_dir / 'attention.json'}")
    return info


def split_folder(data: CourseLayout, split: str) -> Path:
    """The image folder of a boxes.json split (one of GROUNDING_SPLITS) in a course-layout data folder."""
    return {"p2_val": data.p2_images("val"), "p2_train": data.p2_images("train"), "p3": data.p3_images}[split]


@dataclass
class Boxes:
    """The object boxes of one split of images to score captions against (a toy world's boxes.json)."""
    boxes: dict  # boxes.json: {"colours": [...], "shapes": [...], "splits": {split: {file name: {"objects": ...}}}}
    split: str  # which of boxes["splits"]
    images: Path  # the folder of that split's images
    source: dict  # who made the boxes, copied into grounding.json (a toy world's folder, generator and hash)


def measure_grounding(boxes: Boxes, captioner: Captioner, limit: Optional[int] = None,
                      out_dir="results/p3/grounding") -> dict:
    """Scores the captions of the first `limit` images (by name; None: all) of the split of `boxes` with
    hw3.p3.grounding, per decoder layer, and writes grounding.csv (the table) and grounding.json (summary, settings)
    into `out_dir`. Returns grounding.json's content."""
    check_writable(out_dir, "folder")
    scenes = boxes.boxes["splits"][boxes.split]
    names = sorted(scenes)[:limit]
    model = captioner.load()
    checkpoint = captioner.checkpoint_file()
    tokenizer, batch_size = BPETokenizer(), captioner.batch_size
    start = time.time()
    records = []
    for begin in tqdm(range(0, len(names), batch_size), desc=f"grounding on {boxes.split}"):
        batch = names[begin:begin + batch_size]
        pictures = [open_image(boxes.images / name) for name in batch]
        for name, result in zip(batch, caption_images(model, pictures, captioner.decode, batch, batch_size)):
            records += grounding.ground_caption(result, scenes[name]["objects"], tokenizer, boxes.boxes["colours"],
                                                boxes.boxes["shapes"])
    rows = grounding.grounding_table(records)
    info = {**grounding.summarise(records, rows), "checkpoint": checkpoint,
            "checkpoint_sha256": sha256_file(checkpoint), **boxes.source, "split": boxes.split, "images": len(names),
            "decode": asdict(captioner.decode), "seconds": round(time.time() - start, 1),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv_atomically(out_dir / "grounding.csv", grounding.TABLE_COLUMNS,
                         [[row[column] for column in grounding.TABLE_COLUMNS] for row in rows])
    write_json_atomically(out_dir / "grounding.json", info, indent=2)
    print(f"{info['words_scored']} colour/shape words scored on {len(names)} {boxes.split} images "
          f"({info['words_absent']} named something absent)")
    print(f"{'layer':>5} {'share':>7} {'baseline':>8} {'ratio':>6} {'colour':>7} {'shape':>7}  best head")
    for row in rows:
        print(f"{row['layer']:>5} {row['mean_share']:>7.3f} {row['mean_baseline']:>8.3f} {row['ratio']:>6.2f} "
              f"{row['colour_share']:>7.3f} {row['shape_share']:>7.3f}  {row['best_head']} "
              f"({row['best_head_share']:.3f})")
    print(f"best layer: {info['best_layer']}; at least 2x the baseline: {info['meets_2x_baseline']}")
    print(f"wrote {out_dir / 'grounding.csv'} and {out_dir / 'grounding.json'}")
    return info
