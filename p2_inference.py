"""Problem 2 inference: caption every image in a folder with the trained captioner -> JSON {file stem: caption}.

    python3 p2_inference.py IMAGE_DIR OUT_JSON DECODER_BIN [--checkpoint PATH] [--beam-size 3] ...
    bash hw3_2.sh IMAGE_DIR OUT_JSON DECODER_BIN [same options]
    python3 p2_inference.py --count PATH      # the course's parameter count of a checkpoint, nothing else

The checkpoint (hw3/p2/checkpoint.py) is `torch.save` of {trainable parameter name: tensor}, the course's format.
Default: the published one, where `bash hw3_download.sh` puts checkpoints.json's "p2_best"; it loads only when its
sha256 is the published one, and its config comes from that checkpoints.json entry. `--checkpoint PATH` loads your
own file as given, with the config beside it (PATH without its extension + .config.json, e.g. best.config.json
beside p2_train.py's best.pt). The model is rebuilt from the config: the image encoder from its source (`--encoder`
overrides it, e.g. the toy world's clip.pt), GPT-2 from DECODER_BIN, then the trained tensors, verified (loading
fails, naming the keys, when the checkpoint has a tensor the model does not use, lacks one a trainable parameter
needs, or has one of the wrong shape; afterwards every trained tensor must hold the checkpoint's values).

`--count PATH` counts as the course does, torch.load(PATH, map_location="cpu") and the sum of its tensors' numel(),
prints the count and whether it is under the 35M limit, and exits (status 0 under the limit, 1 over it).

Every file directly in IMAGE_DIR with an image suffix (hw3/common/images.py: .jpg/.jpeg/.png/.webp/.bmp/...; the same
choice as hw3_1.sh) gets an entry; any other entry is skipped with a warning line naming it; an image file that
cannot be decoded is reported and captioned with a fallback caption, so the scorer's check that every image has a
caption still holds. Decoding defaults:
hw3/p2/generation.py's DecodeConfig (batched beam search with the key/value cache; beam size 1 = greedy).
"""
import argparse
import os
import sys
import time

import torch

from hw3.common.errors import UserError, run_cli
from hw3.common.files import check_writable
from hw3.common.images import list_image_files
from hw3.common.manifest import checkpoint_path, default_checkpoint_help
from hw3.p2.checkpoint import load_captioner, read_tensors
from hw3.p2.generation import add_decode_options, decode_config_from_args
from hw3.p2.inference import FALLBACK_CAPTION, caption_files, stem_keyed, write_predictions
from hw3.p2.model import MAX_TRAINABLE


def count_option(argv=None):
    """The PATH of `--count PATH` when the command line has one (then nothing else is needed), else None."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--count", metavar="PATH")
    return parser.parse_known_args(argv)[0].count


def count_parameters(path: str) -> int:
    """Prints the course's parameter count of checkpoint `path`; returns the exit status (0 under the limit)."""
    tensors = read_tensors(path)  # torch.load(path, map_location="cpu"), a dict of tensors only
    count = sum(t.numel() for t in tensors.values())
    under = count < MAX_TRAINABLE
    print(f"{path}: {count:,} parameters in {len(tensors)} tensors (torch.load(map_location='cpu'), sum of numel()): "
          f"{'under' if under else 'OVER'} the limit of {MAX_TRAINABLE:,}")
    return 0 if under else 1


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", metavar="PATH",
                        help="print the course's parameter count of checkpoint PATH (torch.load, sum of numel()) and "
                             "whether it is under the 35M limit, then exit; needs no other argument")
    parser.add_argument("image_dir", help="folder of images (any names, any image suffix PIL reads)")
    parser.add_argument("output_json", help="where to write {file stem: caption} (parent folders are created)")
    parser.add_argument("decoder_bin", help="the course's GPT-2 weights (decoder_model.bin)")
    parser.add_argument("--checkpoint", default=None, help=f"trained checkpoint ({default_checkpoint_help()})")
    parser.add_argument("--encoder", default=None,
                        help="image encoder name or CLIP state_dict path (default: the one the checkpoint names)")
    add_decode_options(parser)
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="image-loading processes (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0:
        parser.error("--batch-size must be >= 1 and --workers >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but no GPU is available")
    try:
        args.decode = decode_config_from_args(args)
    except UserError as error:
        parser.error(str(error))
    return args


def main(argv=None) -> int:
    if count_option(argv) is not None:
        return count_parameters(count_option(argv))
    args = parse_args(argv)
    decode = args.decode
    start = time.perf_counter()
    check_writable(args.output_json)  # before the work, not after it
    checkpoint = args.checkpoint or checkpoint_path()  # a malformed checkpoints.json fails here, before any work
    paths = list_image_files(args.image_dir)
    model = load_captioner(args.checkpoint, args.decoder_bin, args.device, args.encoder)  # None: the published one
    print(f"{len(paths)} images in {args.image_dir}; model from {checkpoint} "
          f"(encoder {model.encoder.name}, PEFT {'+'.join(model.config.peft) or 'none'}); {decode}; "
          f"device {args.device}; loaded in {time.perf_counter() - start:.1f} s")
    if not paths:
        print(f"warning: no image files in {args.image_dir}", file=sys.stderr)
    caption_start = time.perf_counter()
    captions, errors = caption_files(model, paths, decode, args.batch_size, args.workers, args.device)
    seconds = time.perf_counter() - caption_start
    for name, message in sorted(errors.items()):
        print(f"warning: could not read {name} ({message}); captioned {FALLBACK_CAPTION!r}", file=sys.stderr)
    predictions = stem_keyed(captions)
    write_predictions(args.output_json, predictions)
    print(f"wrote {len(predictions)} captions to {args.output_json} ({len(errors)} unreadable files): "
          f"{seconds:.1f} s captioning, {len(paths) / max(seconds, 1e-9):.2f} images/s, "
          f"{time.perf_counter() - start:.1f} s in all")
    return 0


if __name__ == "__main__":
    run_cli(main, "p2_inference.py")
