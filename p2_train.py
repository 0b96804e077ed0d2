"""Problem 2 training: an image-conditioned GPT-2 (captioner.py) with one PEFT method, trained on course-format data.

    python3 p2_train.py --config configs/adapter.yaml --out runs/adapter [--set lr=3e-4 model.adapter_size=64]
    python3 p2_train.py --config configs/toy_lora.yaml --toy-world DIR --out runs/toy_lora     # the toy world
    python3 p2_train.py --out runs/adapter --resume                                           # go on after a stop
    torchrun --nproc_per_node 4 p2_train.py --config configs/adapter.yaml --out runs/adapter  # several GPUs

A config file is YAML: `model:` holds captioner.CaptionConfig fields, `decode:` generation.DecodeConfig fields (the
validation captions), the rest TrainConfig fields below. `--set key=value` (dotted for sections, e.g.
model.lora_rank=4) overrides any of them; a few common ones also have their own flag. The run folder OUT gets
best.safetensors (best val CIDEr), last.safetensors + resume.pt, log.jsonl, curves.png, val_predictions.json and
summary.json (see training.py). The TrainConfig fields and their defaults are listed by --help.
"""
import argparse
import dataclasses
import inspect
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional, get_type_hints

import yaml

from captioner import CaptionConfig
from generation import DecodeConfig


@dataclass
class TrainConfig:
    model: CaptionConfig = field(default_factory=CaptionConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    # data (course layout); `toy_world` replaces all four with the toy world's files
    data_dir: str = "hw3_data/p2_data"  # images/{train,val}/*.jpg, train.json, val.json
    decoder_weights: str = "hw3_data/p2_data/decoder_model.bin"  # the course's GPT-2 (its sizes set model.decoder)
    clip_model: str = "ViT-B/32"  # CLIPScore model, as the course's scorer
    toy_world: Optional[str] = None  # a toyworld.py folder: its p2_data, decoder_model.bin and clip.pt (encoder + score)
    # optimisation
    epochs: int = 5
    batch_size: int = 32  # per process and micro-step; the effective batch is batch_size * grad_accum * processes
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05  # linear warmup over this fraction of the optimizer steps, then cosine to zero
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    label_smoothing: float = 0.0
    amp: bool = True  # fp16 autocast + GradScaler on CUDA (never bf16: a 2080 Ti has none); CPU always runs fp32
    epoch_items: str = "captions"  # "captions": every caption once per epoch; "images": one random caption per image
    train_vocab: str = "full"  # "captions": softmax over the tokens of the training captions only (see training.py)
    cpu_threads: int = 0  # torch threads on CPU; 0 = PyTorch's default. 1 is far faster on a machine busy with other jobs
    max_steps: int = 0  # stop after this many optimizer steps (0 = run all epochs); the schedule ends there too
    seed: int = 0
    # data loading
    augment: bool = False  # random crops of the training images (not with cache_features)
    cache_features: bool = False  # encode every image once, keep the tokens (fp16) in cache_dir, train from them
    cache_dir: str = "~/.cache/dlcv-hw3/features"  # shared by runs with the same encoder and images
    num_workers: int = 4  # image-reading processes (cached features are read in the main process)
    # validation: caption the val images, score CIDEr + CLIPScore, keep the best checkpoint by CIDEr
    val_every: int = 0  # optimizer steps between validations; 0 = after every epoch
    val_images: int = 0  # validate on the first N val images only (0 = all; CIDEr then uses their references only)
    val_batch_size: int = 64
    cider_tokenizer: str = "ptb"  # "ptb" as the course's scorer (needs Java), or "simple"
    log_every: int = 20  # optimizer steps between training-loss lines in log.jsonl
    out: str = "runs/p2"

    def __post_init__(self):
        for name, allowed in (("epoch_items", ("captions", "images")), ("train_vocab", ("full", "captions")),
                              ("cider_tokenizer", ("ptb", "simple"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.grad_accum < 1 or not self.lr > 0:
            raise ValueError("epochs, batch_size, grad_accum and lr must be positive")
        if self.augment and self.cache_features:
            raise ValueError("cache_features stores each image's tokens once, so it cannot see augmented images: "
                             "turn off augment or cache_features")

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        values = dict(values)
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown config keys: {unknown}")
        model = CaptionConfig.from_dict(coerce(CaptionConfig, values.pop("model", None) or {}))
        decode_values = coerce(DecodeConfig, values.pop("decode", None) or {})
        unknown = sorted(set(decode_values) - {f.name for f in dataclasses.fields(DecodeConfig)})
        if unknown:
            raise ValueError(f"unknown decode keys: {unknown}")
        return cls(model=model, decode=DecodeConfig(**decode_values), **coerce(cls, values))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def data_paths(self) -> dict:
        """Where the data, the GPT-2 weights, the encoder and the CLIPScore model come from."""
        if self.toy_world:
            root = os.path.expanduser(self.toy_world)
            data, decoder, clip_model = os.path.join(root, "hw3_data", "p2_data"), \
                os.path.join(root, "decoder_model.bin"), os.path.join(root, "clip.pt")
            encoder, description = clip_model, f"toy world {root}"
        else:
            if self.model.encoder == "toy":
                raise ValueError("this is a toy config: give the toy world's folder with --toy-world DIR")
            data, decoder, clip_model = self.data_dir, self.decoder_weights, self.clip_model
            encoder, description = self.model.encoder, f"course data {data}"
        paths = dict(train_json=os.path.join(data, "train.json"), val_json=os.path.join(data, "val.json"),
                     train_images=os.path.join(data, "images", "train"), val_images=os.path.join(data, "images", "val"),
                     decoder=decoder, encoder=encoder, clip_model=clip_model, description=description)
        for key in ("train_json", "val_json", "train_images", "val_images", "decoder"):
            if not os.path.exists(paths[key]):
                raise FileNotFoundError(f"{key} not found: {paths[key]} (set data_dir / decoder_weights / toy_world)")
        return paths


def coerce(cls, values: dict) -> dict:
    """YAML reads `1e-4` as a string and `--set alpha=32` as an int: convert the values of int/float fields."""
    hints = get_type_hints(cls)
    converted = dict(values)
    for key, value in values.items():
        kind = hints.get(key)
        if kind in (int, float) and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            try:
                converted[key] = kind(value) if kind is float or not isinstance(value, str) else int(value)
            except ValueError as error:
                raise ValueError(f"{key} must be a number, got {value!r}") from error
        elif kind is bool and not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
    return converted


def apply_override(values: dict, assignment: str) -> None:
    """`a.b=value` -> values["a"]["b"] = value (parsed as YAML: numbers, true/false, lists [1, 2], null)."""
    if "=" not in assignment:
        raise ValueError(f"--set expects key=value, got {assignment!r}")
    key, text = assignment.split("=", 1)
    *sections, name = key.strip().split(".")
    target = values
    for section in sections:
        target = target.setdefault(section, {})
        if not isinstance(target, dict):
            raise ValueError(f"--set {key}: {section} is not a section")
    target[name] = yaml.safe_load(text)


def load_config(path: Optional[str], overrides: List[str] = (), base: Optional[dict] = None,
                flags: Optional[dict] = None) -> TrainConfig:
    """The config of a YAML file (or `base`, a saved config dict), with `--set` overrides, then `flags` (top-level
    values, None = not given) applied."""
    values = dict(base or {})
    if path:
        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ValueError(f"cannot read config {path}: {error}") from error
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a YAML mapping")
    for assignment in overrides:
        apply_override(values, assignment)
    values.update({key: value for key, value in (flags or {}).items() if value is not None})
    return TrainConfig.from_dict(values)


def parse_args(argv=None) -> argparse.Namespace:
    source = inspect.getsource(TrainConfig)
    fields_text = source[source.index("    model:"):source.index("    def __post_init__")].rstrip()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"config fields (TrainConfig, with defaults):\n{fields_text}")
    parser.add_argument("--config", help="YAML config file (configs/*.yaml); optional with --resume")
    parser.add_argument("--out", help="run folder (default: the config's `out`)")
    parser.add_argument("--toy-world", help="train on a toyworld.py folder instead of the course data")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from last.safetensors + resume.pt (its saved config, plus "
                             "any overrides given here, e.g. --epochs to train longer)")
    parser.add_argument("--cache-features", action="store_true", default=None,
                        help="compute the frozen encoder's tokens once (fp16 memmap in cache_dir) and train from them")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available; torchrun: per rank)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="config overrides, e.g. --set lr=3e-4 model.adapter_size=64 decode.beam_size=5")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    flags = {"out": args.out, "toy_world": args.toy_world, "cache_features": args.cache_features,
             "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "max_steps": args.max_steps}
    if args.resume:
        from run_files import saved_config
        if not args.out:
            raise ValueError("--resume needs --out, the run folder to continue")
        if args.config:
            print(f"--resume: the config saved in {args.out}/resume.pt applies, not {args.config} "
                  "(change values with --set)", file=sys.stderr)
        config = load_config(None, args.overrides, base=saved_config(args.out), flags=flags)
    elif not args.config:
        raise ValueError("give --config FILE (or --resume --out DIR)")
    else:
        config = load_config(args.config, args.overrides, flags=flags)
    return config


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = config_from_args(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"p2_train.py: error: {error}", file=sys.stderr)
        return 2
    from training import train
    train(config, config_file=args.config, resume=args.resume, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
