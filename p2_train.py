"""Problem 2 training: an image-conditioned GPT-2 (hw3/p2/model.py) with one PEFT method, on course-format data.

    python3 p2_train.py --config configs/adapter.yaml --out runs/adapter [--set lr=3e-4 model.adapter_size=64]
    python3 p2_train.py --config configs/toy_lora.yaml --toy-world DIR --out runs/toy_lora     # the toy world
    python3 p2_train.py --out runs/adapter --resume                                           # go on after a stop
    python3 p2_train.py --init runs/adapter --config configs/scst.yaml --out runs/adapter_scst  # SCST stage
    torchrun --nproc_per_node 4 p2_train.py --config configs/adapter.yaml --out runs/adapter  # several GPUs

A config file is YAML (hw3/p2/config.py): `model:` holds CaptionConfig fields, `decode:` DecodeConfig fields (the
validation captions), the rest TrainConfig fields below. `--set key=value` (dotted for sections, e.g.
model.lora_rank=4) overrides any of them; a few common ones also have their own flag. The run folder OUT gets
best.pt (best val CIDEr), last.pt + resume.pt, log.jsonl, curves.png, val_predictions.json and summary.json (see
hw3/p2/run_files.py); best.pt and last.pt are the course's checkpoint format, with their configs beside them in
best.config.json and last.config.json (hw3/p2/checkpoint.py). The TrainConfig fields and their defaults are listed
by --help.
`--toy-world DIR` is short for the four settings a course run names: data_dir=DIR/hw3_data/p2_data,
decoder_weights=DIR/decoder_model.bin, model.encoder=DIR/clip.pt and clip_model=DIR/clip.pt.

The self-critical stage (hw3/p2/scst.py) starts from a finished cross-entropy run: `--init RUN` takes RUN's saved
config (its model, data and decoding) and RUN/best.pt, then the stage's config file (configs/scst.yaml,
configs/toy_scst.yaml: stage, epochs, lr, `scst:` section) over it, then --set and the flags.

A run holds OUT for its lifetime (a second run there is refused). Ctrl-C or SIGTERM stops it at the next optimizer
step and saves (exit status 130 or 143); `--resume` goes on, with any --set values (lr, epochs) from the restored
step on. A non-finite loss stops it in one line, before anything non-finite is saved (docs/training.md#resume).
"""
import argparse
import os
import sys
from typing import List

from hw3.common.errors import UserError, run_cli
from hw3.p2.config import SCSTConfig, TrainConfig, field_help, load_config
from hw3.p2.run_files import saved_config
from hw3.p2.training import TrainingStopped, train
from hw3.toy.world import ToyWorld


def parse_args(argv=None) -> argparse.Namespace:
    scst_fields = field_help(SCSTConfig).replace("\n    ", "\n        ")
    fields_text = f"{field_help(TrainConfig)}\n    scst fields (SCSTConfig):\n        {scst_fields.strip()}"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"config fields (TrainConfig, with defaults):\n{fields_text}")
    parser.add_argument("--config", help="YAML config file (configs/*.yaml); optional with --resume")
    parser.add_argument("--out", help="run folder (default: the config's `out`)")
    parser.add_argument("--toy-world", help="train on a toyworld.py folder: its p2_data, decoder_model.bin and clip.pt "
                                            "(encoder and CLIPScore model) instead of the course data")
    parser.add_argument("--init", metavar="RUN",
                        help="start from a finished run: its saved config under --config's values, and its "
                             "best.pt (the self-critical stage: --config configs/scst.yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from resume.pt (its saved config and tensors, plus "
                             "any overrides given here, e.g. --epochs to train longer)")
    parser.add_argument("--cache-features", action="store_true", default=None,
                        help="compute the frozen encoder's tokens once (fp16 memmap in cache_dir) and train from them")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in --out (without it, a finished run of the same config is "
                             "left as it is, and any other run there is refused)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available; torchrun: per rank)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="config overrides, e.g. --set lr=3e-4 model.adapter_size=64 decode.beam_size=5")
    return parser.parse_args(argv)


def toy_world_settings(folder: str) -> List[str]:
    """The `--set` values that --toy-world DIR stands for."""
    world = ToyWorld(os.path.abspath(os.path.expanduser(folder)))
    return [f"data_dir={world.p2_data}", f"decoder_weights={world.decoder}", f"model.encoder={world.clip}",
            f"clip_model={world.clip}"]


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    flags = {"out": args.out, "cache_features": args.cache_features,
             "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "max_steps": args.max_steps}
    if args.toy_world:
        args.overrides = toy_world_settings(args.toy_world) + args.overrides
    if args.resume:
        if not args.out:
            raise UserError("--resume needs --out, the run folder to continue")
        if args.config:
            print(f"--resume: the config saved in {args.out}/resume.pt applies, not {args.config} "
                  "(change values with --set)", file=sys.stderr)
        config = load_config(None, args.overrides, base=saved_config(args.out), flags=flags)
    elif args.init:
        checkpoint = os.path.join(args.init, "best.pt")
        if not os.path.isfile(checkpoint):
            raise UserError(f"--init {args.init}: no best.pt there (give a finished p2_train.py run folder)")
        if not args.out:
            raise UserError("--init needs --out, the new run's folder")
        base = dict(saved_config(args.init), init=checkpoint)
        config = load_config(args.config, args.overrides, base=base, flags=flags)
    elif not args.config:
        raise UserError("give --config FILE (or --resume --out DIR)")
    else:
        config = load_config(args.config, args.overrides, flags=flags)
    return config


def main(argv=None) -> int:
    """0 when the run is done; after a Ctrl-C or SIGTERM, 128 + the signal's number (130, 143), as a shell reports a
    process the signal ended."""
    args = parse_args(argv)
    try:
        train(config_from_args(args), config_file=args.config, resume=args.resume, device=args.device,
              overwrite=args.overwrite)
    except TrainingStopped as stop:
        if str(stop):
            print(f"\n{stop}", flush=True)
        return stop.exit_status
    return 0


if __name__ == "__main__":
    run_cli(main, "p2_train.py")
