"""Problem 3: caption images and draw each word's cross-attention over the image (attention_maps.py).

    python3 p3_attention.py IMAGE_DIR --checkpoint best.safetensors --decoder decoder_model.bin [--out-dir DIR]
        one PNG per image (the course's layout) and attention.json (captions, words, settings)
    python3 p3_attention.py VAL_IMAGE_DIR --top-last PER_IMAGE_CSV --checkpoint ... --decoder ...
        only the top-1 and last-1 images by CLIPScore of p2_evaluate.py's --per-image-csv (top1_*.png, last1_*.png)
    python3 p3_attention.py grounding TOY_WORLD_DIR --checkpoint ... [--split p2_val] [--out-dir DIR]
        grounding.csv / grounding.json: per decoder layer, the share of each colour/shape word's attention inside
        the named object's box against the uniform-attention baseline (grounding.py), and the best layer

Layer: `--layer auto` (default) takes the best layer of `--grounding grounding.json` (measured for the same
checkpoint), else the last cross-attention layer; or give `last` or a layer index. `--head N` shows one head instead
of the heads' mean.
"""
import argparse
import csv
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional, Tuple

import matplotlib

matplotlib.use("Agg")  # headless: figures are only ever saved
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

import attention_maps as am  # noqa: E402
import grounding  # noqa: E402
from captioner import load_captioner  # noqa: E402
from generation import DecodeConfig, clean_caption  # noqa: E402
from hw3_download import checkpoint_path  # noqa: E402
from tokenizer import BPETokenizer  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CSV_COLUMNS = ("file_name", "caption", "cider", "clip_score")  # p2_evaluate.py --per-image-csv


class InputError(ValueError):
    pass


def add_model_options(parser: argparse.ArgumentParser, decoder_required: bool = True) -> None:
    parser.add_argument("--checkpoint", help="trained captioner, e.g. best.safetensors of p2_train.py (default: "
                                             f"{checkpoint_path('p2_best')}, fetched by hw3_download.sh)")
    parser.add_argument("--decoder", required=decoder_required, help="the course's decoder_model.bin (GPT-2)")
    parser.add_argument("--encoder", help="image encoder override, e.g. the toy world's clip.pt (default: the "
                                          "checkpoint's)")
    parser.add_argument("--beam-size", type=int, default=3, help="beam size (1 = greedy; default %(default)s)")
    parser.add_argument("--max-length", type=int, default=30, help="new tokens per caption (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (default %(default)s)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(args):
    args.checkpoint = args.checkpoint or str(checkpoint_path("p2_best"))
    for label, path in (("checkpoint", args.checkpoint), ("decoder", args.decoder)):
        if not os.path.isfile(path):
            raise InputError(f"{label} not found: {path}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_captioner(args.checkpoint, args.decoder, device, encoder=args.encoder)
    return model, DecodeConfig(beam_size=args.beam_size, max_length=args.max_length)


def cross_attention_layers(model) -> List[int]:
    return [i for i, block in enumerate(model.decoder.transformer.h) if block.cross_attn is not None]


def choose_layer(choice: str, layers: List[int], grounding_json: Optional[str], checkpoint: str) -> Tuple[int, str]:
    """(layer, why) for --layer auto|last|N."""
    if choice == "last":
        return layers[-1], "the last cross-attention layer (--layer last)"
    if choice != "auto":
        if not choice.lstrip("-").isdigit() or int(choice) not in layers:
            raise InputError(f"--layer {choice}: give auto, last or one of the cross-attention layers {layers}")
        return int(choice), "given with --layer"
    if not grounding_json:
        return layers[-1], "the last cross-attention layer (no --grounding measurement given)"
    measured = json.loads(Path(grounding_json).read_text())
    if measured.get("checkpoint_sha256") != file_sha256(checkpoint):
        raise InputError(f"{grounding_json} was measured for another checkpoint ({measured.get('checkpoint')}); "
                         "measure this one with `p3_attention.py grounding` or pass --layer")
    if measured.get("best_layer") not in layers:
        raise InputError(f"{grounding_json} names no usable best layer ({measured.get('best_layer')})")
    return measured["best_layer"], f"best grounding layer measured in {grounding_json}"


def image_files(folder: str) -> List[Path]:
    if not os.path.isdir(folder):
        raise InputError(f"image folder not found: {folder}")
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise InputError(f"no .jpg/.png images in {folder}")
    return paths


def top_and_last(csv_path: str, folder: str) -> List[Tuple[Path, dict]]:
    """The rows of the highest and the lowest CLIPScore in p2_evaluate.py's per-image CSV, with their image paths."""
    if not os.path.isfile(csv_path):
        raise InputError(f"per-image CSV not found: {csv_path}")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{csv_path} lacks columns {missing} (expected p2_evaluate.py --per-image-csv output "
                             f"with {list(CSV_COLUMNS)})")
        rows = list(reader)
    if not rows:
        raise InputError(f"{csv_path} has no rows")
    for row in rows:
        row["clip_score"], row["cider"] = float(row["clip_score"]), float(row["cider"])
    ranked = sorted(rows, key=lambda row: -row["clip_score"])
    picked = [("top1", ranked[0]), ("last1", ranked[-1])]
    selection = []
    for rank, row in picked:
        path = Path(folder) / row["file_name"]
        if not path.is_file():
            raise InputError(f"{row['file_name']} (from {csv_path}) is not in {folder}")
        selection.append((path, {"rank": rank, "clip_score": row["clip_score"], "cider": row["cider"],
                                 "scored_caption": row["caption"]}))
    return selection


def figures_main(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(prog="p3_attention.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", help="folder of images (with --top-last: the folder the CSV's images are in)")
    parser.add_argument("--top-last", metavar="PER_IMAGE_CSV",
                        help="draw only the top-1 and last-1 images by CLIPScore of this p2_evaluate.py CSV")
    parser.add_argument("--layer", default="auto", help="auto (default), last, or a decoder layer index")
    parser.add_argument("--head", type=int, help="one attention head (default: the mean of the heads)")
    parser.add_argument("--grounding", metavar="GROUNDING_JSON", help="grounding.json whose best layer --layer auto "
                                                                      "uses")
    parser.add_argument("--token-panels", action="store_true", help="one panel per BPE token (default: per word)")
    parser.add_argument("--out-dir", default="results/p3", help="where the PNGs go (default %(default)s)")
    add_model_options(parser)
    args = parser.parse_args(argv)
    try:
        if args.top_last:
            selection = top_and_last(args.top_last, args.images)
        else:
            selection = [(path, {}) for path in image_files(args.images)]
        model, decode = load_model(args)
        layer, why = choose_layer(args.layer, cross_attention_layers(model), args.grounding, args.checkpoint)
    except (InputError, OSError, ValueError) as error:
        parser.error(str(error))
    print(f"layer {layer}: {why}; {'heads averaged' if args.head is None else f'head {args.head}'}")

    tokenizer, out_dir = BPETokenizer(), Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = [Image.open(path).convert("RGB") for path, _ in selection]
    with tqdm(total=len(images), desc="captioning") as progress:
        results = am.caption_images(model, images, decode, [path.stem for path, _ in selection], args.batch_size,
                                    progress)
    records = []
    for (path, extra), result in zip(selection, results):
        caption = clean_caption(tokenizer.decode(result.token_ids))
        prefix = f"{extra['rank']}_" if extra else ""
        title = None
        if extra:
            title = f"{extra['rank']}: {path.name}, CLIPScore {extra['clip_score']:.4f}\n\"{caption}\""
        figure = am.plot_caption_attention(result, tokenizer, layer, args.head, not args.token_panels, title=title)
        figure_path = out_dir / f"{prefix}{path.stem}.png"
        figure.savefig(figure_path, dpi=110)
        words = am.caption_words(result, tokenizer, not args.token_panels)
        records.append({"name": path.stem, "file": str(path), "figure": str(figure_path), "caption": caption,
                        "tokens": result.token_ids, "words": [w for w, _ in words], "ended": result.ended,
                        "cls_share": float(result.prefix_share[layer].mean()), **extra})
        if extra and caption != extra["scored_caption"]:
            print(f"note: {path.name}: caption {caption!r} differs from the scored one {extra['scored_caption']!r} "
                  "(another checkpoint or decoding settings?)")
    info = {"checkpoint": args.checkpoint, "checkpoint_sha256": file_sha256(args.checkpoint), "layer": layer,
            "layer_reason": why, "head": args.head, "decode": asdict(decode), "per_image_csv": args.top_last,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "images": records}
    (out_dir / "attention.json").write_text(json.dumps(info, indent=2))
    for record in records:
        print(f"wrote {record['figure']}: {record['caption']!r}")
    print(f"wrote {out_dir / 'attention.json'}")


def grounding_main(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(prog="p3_attention.py grounding", description=grounding.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("world", help="toy world folder (toyworld.py), with boxes.json")
    parser.add_argument("--split", default="p2_val", choices=["p2_val", "p3", "p2_train"],
                        help="which images of boxes.json (default %(default)s)")
    parser.add_argument("--limit", type=int, help="only the first N images of the split (sorted by name)")
    parser.add_argument("--out-dir", default="results/p3/grounding", help="default %(default)s")
    add_model_options(parser, decoder_required=False)
    args = parser.parse_args(argv)
    world = Path(args.world)
    folders = {"p2_val": "hw3_data/p2_data/images/val", "p2_train": "hw3_data/p2_data/images/train",
               "p3": "hw3_data/p3_data/images"}
    try:
        if not (world / "boxes.json").is_file():
            raise InputError(f"{world} has no boxes.json: not a toy world (build one with toyworld.py)")
        boxes = json.loads((world / "boxes.json").read_text())
        split = boxes["splits"][args.split]
        names = sorted(split)[:args.limit]
        args.decoder = args.decoder or str(world / "decoder_model.bin")
        args.encoder = args.encoder or str(world / "clip.pt")
        model, decode = load_model(args)
    except (InputError, OSError, ValueError) as error:
        parser.error(str(error))
    tokenizer, folder = BPETokenizer(), world / folders[args.split]
    start = time.time()
    records = []
    for begin in tqdm(range(0, len(names), args.batch_size), desc=f"grounding on {args.split}"):
        batch = names[begin:begin + args.batch_size]
        images = [Image.open(folder / name).convert("RGB") for name in batch]
        for name, result in zip(batch, am.caption_images(model, images, decode, batch, args.batch_size)):
            records += grounding.ground_caption(result, split[name]["objects"], tokenizer, boxes["colours"],
                                                boxes["shapes"])
    rows = grounding.grounding_table(records)
    manifest = json.loads((world / "toyworld.json").read_text()) if (world / "toyworld.json").is_file() else {}
    info = {**grounding.summarise(records, rows), "checkpoint": args.checkpoint,
            "checkpoint_sha256": file_sha256(args.checkpoint), "world": str(world),
            "world_generator": manifest.get("generator_version"), "world_hash": manifest.get("hash"),
            "split": args.split, "images": len(names), "decode": asdict(decode),
            "seconds": round(time.time() - start, 1), "created_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "grounding.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=grounding.TABLE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "grounding.json").write_text(json.dumps(info, indent=2))
    print(f"{info['words_scored']} colour/shape words scored on {len(names)} {args.split} images "
          f"({info['words_absent']} named something absent)")
    print(f"{'layer':>5} {'share':>7} {'baseline':>8} {'ratio':>6} {'colour':>7} {'shape':>7}  best head")
    for row in rows:
        print(f"{row['layer']:>5} {row['mean_share']:>7.3f} {row['mean_baseline']:>8.3f} {row['ratio']:>6.2f} "
              f"{row['colour_share']:>7.3f} {row['shape_share']:>7.3f}  {row['best_head']} "
              f"({row['best_head_share']:.3f})")
    print(f"best layer: {info['best_layer']}; at least 2x the baseline: {info['meets_2x_baseline']}")
    print(f"wrote {out_dir / 'grounding.csv'} and {out_dir / 'grounding.json'}")


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "grounding":
        grounding_main(argv[1:])
    else:
        figures_main(argv)


if __name__ == "__main__":
    main()
