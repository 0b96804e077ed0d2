"""Zero-shot image classification with OpenAI CLIP (DLCV HW3, problem 1). No training of any kind.

    python3 p1_clip.py IMAGE_DIR ID2LABEL OUT_CSV [--model NAME_OR_PATH ...] [--templates SET] ...
    python3 p1_clip.py report IMAGE_DIR ID2LABEL [--out-dir results/p1] ...   (report analyses)

The classifier is hw3/p1/zero_shot.py (its docstring explains the method and the defaults), the report analyses are
hw3/p1/analysis.py. This file only reads the command line.
"""
import argparse
import sys
from typing import Optional, Sequence

import torch

from hw3.common.errors import UserError, run_cli
from hw3.p1.prompts import ENSEMBLE_SETS, TEMPLATE_SETS, resolve_templates
from hw3.p1.zero_shot import DEFAULT_MODELS, ClassifierConfig, predict_folder

PROG = "p1_clip.py"


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
        raise UserError("--batch-size must be >= 1 and --workers >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no GPU is available")
    try:
        resolve_templates(args.templates)  # fail before any model is loaded
    except ValueError as error:
        raise UserError(f"--templates: {error}") from None
    return ClassifierConfig(models=tuple(args.models or DEFAULT_MODELS), templates=args.templates,
                            synonyms=args.synonyms, flip=args.flip, batch_size=args.batch_size,
                            num_workers=args.num_workers, device=args.device)


def predict_main(argv: Sequence[str]):
    parser = argparse.ArgumentParser(
        prog=PROG, description="Zero-shot CLIP classification of every file in a folder -> CSV `filename,label` "
                               "(label = class id). A class is the mean text embedding of its prompts (--templates); "
                               "an image gets the class most similar to the mean embedding of the image and its "
                               "mirror image (--no-flip: the image alone). Files that are not readable images are "
                               "skipped and reported on stderr. Run `python3 p1_clip.py report --help` for the "
                               "report analyses.")
    parser.add_argument("image_dir", help="folder of images (.png/.jpg/...; any file names)")
    parser.add_argument("id2label", help="JSON mapping class id -> class name")
    parser.add_argument("output_csv", help="where to write the predictions (parent folders are created)")
    add_classifier_options(parser)
    args = parser.parse_args(argv)
    print(predict_folder(args.image_dir, args.id2label, args.output_csv, config_from_args(args)))


def report_main(argv: Sequence[str]):
    from hw3.p1 import analysis  # the report's analyses and matplotlib: classifying (hw3_1.sh) loads neither

    parser = argparse.ArgumentParser(prog=f"{PROG} report", description=analysis.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image_dir", help="labelled images named {class_id}_{image_id}.png (e.g. p1_data/val)")
    parser.add_argument("id2label", help="JSON mapping class id -> class name")
    parser.add_argument("--out-dir", default="results/p1", help="where the files go (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=3, help="images in top5.png (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed drawing those images (default: %(default)s)")
    parser.add_argument("--ensembles", nargs="+", default=list(ENSEMBLE_SETS), choices=sorted(TEMPLATE_SETS),
                        metavar="SET", help="template sets to compare (default: %(default)s)")
    parser.add_argument("--top-confusions", type=int, default=20, help="pairs in confusions.csv (%(default)s)")
    add_classifier_options(parser)
    args = parser.parse_args(argv)
    if args.samples < 1 or args.top_confusions < 0:
        raise UserError("--samples must be >= 1 and --top-confusions >= 0")
    lines = analysis.write_report(args.image_dir, args.id2label, config_from_args(args), args.out_dir,
                                  samples=args.samples, seed=args.seed, ensembles=args.ensembles,
                                  top_confusions=args.top_confusions)
    print("\n".join(lines))


def main(argv: Optional[Sequence[str]] = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["report"]:
        report_main(argv[1:])
    else:
        predict_main(argv)


if __name__ == "__main__":
    run_cli(main, PROG)
