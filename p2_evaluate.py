"""Scores a caption prediction JSON the way the course's p2_evaluate.py does, and prints `CIDEr: x | CLIPScore: y`.

    python3 p2_evaluate.py --pred_file pred.json [--images_root p2_data/images/val/] [--annotation_file p2_data/val.json]

Same CLI and numbers as the course's scorer (CIDEr-D with the PTB tokenizer, which needs Java; CLIPScore with CLIP
ViT-B/32 on the bare caption, one image at a time). Beyond it: captions over 77 CLIP tokens are truncated with a
warning, `--per-image-csv` writes every image's scores (sorted by CLIPScore, best first), `--all-metrics` adds
BLEU-4 / METEOR / ROUGE-L, `--json-out` saves the summary, `--clip-model` picks another CLIP (e.g. the toy world's
DIR/clip.pt), and `--tokenizer simple` is a pure-Python approximation for machines without Java.
"""
import argparse
import os

from hw3.common.errors import UserError, run_cli
from hw3.common.files import check_writable, read_json, write_csv_atomically, write_json_atomically
from hw3.p2 import metrics


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred_file", required=True, help="prediction JSON {image name without .jpg: caption}")
    parser.add_argument("--images_root", default="p2_data/images/val/", help="folder of the annotated images")
    parser.add_argument("--annotation_file", default="p2_data/val.json", help="COCO-style caption annotations")
    parser.add_argument("--clip-model", default="ViT-B/32",
                        help="CLIP for CLIPScore: an OpenAI name (the course uses ViT-B/32) or a state_dict path")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--tokenizer", choices=sorted(metrics.TOKENIZERS), default="ptb",
                        help="ptb: the course's (Java); simple: pure-Python approximation, numbers may differ")
    parser.add_argument("--all-metrics", action="store_true", help="also BLEU-4, METEOR (Java) and ROUGE-L")
    parser.add_argument("--per-image-csv", metavar="PATH", help="write file_name,caption,cider,clip_score per image")
    parser.add_argument("--json-out", metavar="PATH", help="write the summary as JSON")
    parser.add_argument("--num-workers", type=int, default=2, help="image-reading worker processes")
    return parser.parse_args(argv)


def ranked_by_clip_score(per_image: dict) -> list:
    return sorted(per_image.items(), key=lambda item: -item[1]["CLIPScore"])


def write_per_image_csv(path: str, per_image: dict) -> None:
    write_csv_atomically(path, ["file_name", "caption", "cider", "clip_score"],
                         [[row["file_name"], row["caption"], row["CIDEr"], row["CLIPScore"]]
                          for _, row in ranked_by_clip_score(per_image)])


def summary(result: dict, args) -> dict:
    ranked = ranked_by_clip_score(result["per_image"])
    best, worst = ranked[0][1], ranked[-1][1]
    keys = ["CIDEr", "CLIPScore", "BLEU-4", "METEOR", "ROUGE-L", "num_images", "tokenizer", "clip_model", "seconds"]
    return {**{key: result[key] for key in keys if key in result}, "pred_file": args.pred_file,
            "annotation_file": args.annotation_file, "top1_clip_score": best, "last1_clip_score": worst}


def print_summary(info: dict) -> None:
    print(f"images scored:   {info['num_images']} ({info['pred_file']} against {info['annotation_file']})")
    tokenizer = "PTB (Java), as the course" if info["tokenizer"] == "ptb" else \
        "simple (pure-Python APPROXIMATION of the course's PTB tokenizer; CIDEr may differ slightly)"
    print(f"tokenizer:       {tokenizer}")
    print(f"CLIP model:      {info['clip_model']}")
    for name in ["BLEU-4", "METEOR", "ROUGE-L"]:
        if name in info:
            print(f"{name + ':':<16} {info[name]:.4f}")
    for label, key in [("best CLIPScore", "top1_clip_score"), ("worst CLIPScore", "last1_clip_score")]:
        row = info[key]
        print(f"{label + ':':<16} {row['CLIPScore']:.4f} {row['file_name']}: {row['caption']!r} "
              f"(CIDEr {row['CIDEr']:.4f})")
    print(f"time:            {info['seconds']:.1f} s")


def main(argv=None) -> dict:
    args = parse_args(argv)
    for output in (args.per_image_csv, args.json_out):  # before scoring, not after it
        if output:
            check_writable(output)
    predictions = read_json(args.pred_file, "prediction file")
    if not os.path.isfile(args.annotation_file):
        raise UserError(f"annotation file not found: {args.annotation_file}")
    if not os.path.isdir(args.images_root):
        raise UserError(f"image folder not found: {args.images_root}")
    result = metrics.score_captions(predictions, args.annotation_file, args.images_root,
                                    clip_model=args.clip_model, device=args.device, tokenizer=args.tokenizer,
                                    extra_metrics=args.all_metrics, num_workers=args.num_workers)

    info = summary(result, args)
    print_summary(info)
    if args.per_image_csv:
        write_per_image_csv(args.per_image_csv, result["per_image"])
        print(f"per-image scores (best CLIPScore first): {args.per_image_csv}")
    if args.json_out:
        write_json_atomically(args.json_out, info, indent=2)
        print(f"summary: {args.json_out}")
    print(f"CIDEr: {result['CIDEr']} | CLIPScore: {result['CLIPScore']}")
    return result


if __name__ == "__main__":
    run_cli(main, "p2_evaluate.py")
