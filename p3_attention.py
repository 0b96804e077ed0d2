"""Problem 3: caption images and draw each word's cross-attention over the image (hw3/p3/commands.py).

    python3 p3_attention.py IMAGE_DIR --checkpoint best.pt --decoder decoder_model.bin [--out-dir DIR]
        one PNG per image (the course's layout) and attention.json (captions, words, settings)
    python3 p3_attention.py VAL_IMAGE_DIR --top-last PER_IMAGE_CSV --checkpoint ... --decoder ...
        only the top-1 and last-1 images by CLIPScore of p2_evaluate.py's --per-image-csv (top1_*.png, last1_*.png)
    python3 p3_attention.py grounding TOY_WORLD_DIR --checkpoint ... [--split p2_val] [--out-dir DIR]
        grounding.csv / grounding.json: per decoder layer, the share of each colour/shape word's attention inside
        the named object's box against the uniform-attention baseline (hw3/p3/grounding.py), and the best layer

Layer: `--layer auto` (default) takes the best layer of `--grounding grounding.json` (measured for the same
checkpoint), else the last cross-attention layer; or give `last` or a layer index. `--head N` shows one head instead
of the heads' mean.
"""
import argparse
import dataclasses
import sys
from typing import List, Optional

from hw3.common.errors import run_cli
from hw3.common.files import read_json
from hw3.common.layout import CourseLayout
from hw3.common.manifest import default_checkpoint_help
from hw3.p2.generation import add_decode_options, decode_config_from_args
from hw3.p3 import grounding
from hw3.p3.commands import GROUNDING_SPLITS, Boxes, Captioner, draw_figures, measure_grounding, split_folder
from hw3.toy.world import ToyWorld


def add_model_options(parser: argparse.ArgumentParser, in_world: bool = False) -> None:
    """The captioner's options; `in_world`: the decoder and encoder default to the toy world's."""
    parser.add_argument("--checkpoint", help=f"trained captioner, e.g. best.pt of p2_train.py "
                                             f"({default_checkpoint_help()})")
    parser.add_argument("--decoder", required=not in_world, help="the course's decoder_model.bin (GPT-2)"
                                                                 + (" (default: the world's)" if in_world else ""))
    parser.add_argument("--encoder", help="image encoder override, e.g. the toy world's clip.pt (default: "
                                          + ("the world's)" if in_world else "the checkpoint's)"))
    add_decode_options(parser)
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (default %(default)s)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")


def captioner(args: argparse.Namespace) -> Captioner:
    return Captioner(args.checkpoint, args.decoder, args.encoder, args.device, decode_config_from_args(args),
                     args.batch_size)


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
    draw_figures(args.images, captioner(args), args.out_dir, top_last=args.top_last, layer=args.layer,
                 head=args.head, grounding_json=args.grounding, merge_subwords=not args.token_panels)


def grounding_main(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(prog="p3_attention.py grounding", description=grounding.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("world", help="toy world folder (toyworld.py), with boxes.json")
    parser.add_argument("--split", default="p2_val", choices=GROUNDING_SPLITS,
                        help="which images of boxes.json (default %(default)s)")
    parser.add_argument("--limit", type=int, help="only the first N images of the split (sorted by name)")
    parser.add_argument("--out-dir", default="results/p3/grounding", help="default %(default)s")
    add_model_options(parser, in_world=True)
    args = parser.parse_args(argv)
    world = ToyWorld(args.world).check()
    model = dataclasses.replace(captioner(args), decoder=args.decoder or str(world.decoder),
                                encoder=args.encoder or str(world.clip))
    measure_grounding(world_boxes(world, args.split), model, args.limit, args.out_dir)


def world_boxes(world: ToyWorld, split: str) -> Boxes:
    """One split of a toy world's boxes.json, its image folder, and the world's folder, generator and hash."""
    manifest = world.manifest()
    return Boxes(read_json(world.boxes, "toy world boxes.json"), split, split_folder(CourseLayout(world.data), split),
                 {"world": str(world.root), "world_generator": manifest.get("generator_version"),
                  "world_hash": manifest.get("hash")})


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "grounding":
        grounding_main(argv[1:])
    else:
        figures_main(argv)


if __name__ == "__main__":
    run_cli(main, "p3_attention.py")
