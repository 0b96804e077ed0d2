"""The configuration of a P2 training run: TrainConfig (YAML file + `--set` overrides) and the typed paths of the
data it trains on.

A config file is YAML: `model:` holds hw3.p2.model.CaptionConfig fields, `decode:` hw3.p2.generation.DecodeConfig
fields (the validation captions), the rest TrainConfig fields. `--set key=value` (dotted for sections, e.g.
model.lora_rank=4) overrides any of them.
"""
import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import List, Optional, get_type_hints

import yaml

from hw3.common.errors import UserError
from hw3.p2.generation import DecodeConfig
from hw3.p2.model import CaptionConfig
from hw3.toy.world import ToyWorld


@dataclass(frozen=True)
class DataPaths:
    """The files one training run reads."""
    train_json: str
    val_json: str
    train_images: str
    val_images: str
    decoder: str  # the course's GPT-2 weights (decoder_model.bin)
    encoder: str  # the frozen image encoder: a name (ViT-L/14, timm:...) or a CLIP state_dict path
    clip_model: str  # the CLIPScore model
    toy_world: Optional[str] = None  # the toy world's root folder, when the data is one

    @classmethod
    def of_course_data(cls, data_dir: str, decoder: str, encoder: str, clip_model: str) -> "DataPaths":
        """The course layout: DATA/train.json, DATA/val.json, DATA/images/{train,val}/."""
        return cls(os.path.join(data_dir, "train.json"), os.path.join(data_dir, "val.json"),
                   os.path.join(data_dir, "images", "train"), os.path.join(data_dir, "images", "val"),
                   decoder, encoder, clip_model)

    @classmethod
    def of_toy_world(cls, world: ToyWorld) -> "DataPaths":
        """The toy world's p2_data and decoder_model.bin; its tiny CLIP is both the encoder and the CLIPScore model."""
        course = cls.of_course_data(str(world.p2_data), str(world.decoder), str(world.clip), str(world.clip))
        return dataclasses.replace(course, toy_world=str(world.root))

    @property
    def description(self) -> str:
        if self.toy_world:
            return f"toy world {self.toy_world}"
        return f"course data {os.path.dirname(self.train_json)}"

    def check(self) -> "DataPaths":
        """Raises UserError naming the first input that does not exist."""
        for name in ("train_json", "val_json", "train_images", "val_images", "decoder"):
            if not os.path.exists(getattr(self, name)):
                raise UserError(f"{name} not found: {getattr(self, name)} (set data_dir / decoder_weights / "
                                "toy_world, or --toy-world DIR)")
        return self


@dataclass
class SCSTConfig:
    """Self-critical sequence training (stage: scst, hw3/p2/scst.py): the `scst:` section of a config."""
    samples: int = 3  # candidate captions per image and step (K)
    candidates: str = "beam"  # "beam": the K best of a beam-K search (hw3_2.sh's settings); "sample": drawn
    baseline: str = "mean"  # "mean": mean reward of the image's other samples (Luo); "greedy": its greedy caption's
    temperature: float = 1.0  # of the sampling distribution (candidates: sample)
    max_length: int = 0  # tokens per candidate, the end token included; 0 = decode.max_length
    end_token: bool = True  # reward over the words + an end word: a caption ending "... on a" matches no reference
    clip_weight: float = 1.0  # reward = CIDEr-D + clip_weight * CLIPScore (of clip_model, 2.5 * max(cos, 0)); 0 = off

    def __post_init__(self):
        if self.candidates not in ("sample", "beam"):
            raise UserError(f"scst.candidates must be 'sample' or 'beam', got {self.candidates!r}")
        if self.baseline not in ("mean", "greedy"):
            raise UserError(f"scst.baseline must be 'mean' or 'greedy', got {self.baseline!r}")
        if self.samples < (2 if self.baseline == "mean" else 1):
            raise UserError("scst.samples must be >= 2 with the mean baseline (>= 1 with greedy)")
        if self.temperature <= 0 or self.max_length < 0 or self.clip_weight < 0:
            raise UserError("scst.temperature must be > 0, scst.max_length and scst.clip_weight >= 0")


@dataclass
class TrainConfig:
    """Everything a training run needs besides its run folder's state; saved in the run folder (config.yaml,
    resume.pt). The field comments below are what `p2_train.py --help` lists."""
    model: CaptionConfig = field(default_factory=CaptionConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    scst: SCSTConfig = field(default_factory=SCSTConfig)  # used by stage: scst
    stage: str = "xe"  # "xe": cross-entropy on the references; "scst": self-critical training of the `init` model
    init: Optional[str] = None  # a trained checkpoint (e.g. RUN/best.safetensors) to start from; p2_train.py --init RUN
    # data (course layout); `toy_world` replaces all four with the toy world's files
    data_dir: str = "hw3_data/p2_data"  # images/{train,val}/*.jpg, train.json, val.json
    decoder_weights: str = "hw3_data/p2_data/decoder_model.bin"  # the course's GPT-2 (its sizes set model.decoder)
    clip_model: str = "ViT-B/32"  # CLIPScore model, as the course's scorer
    toy_world: Optional[str] = None  # a toyworld.py folder: its p2_data, decoder_model.bin, clip.pt (encoder + score)
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
    train_vocab: str = "full"  # "captions": softmax over the tokens of the training captions only (hw3/p2/training.py)
    cpu_threads: int = 0  # torch threads on CPU; 0 = PyTorch's default (1 is far faster on a machine busy elsewhere)
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
        for name, allowed in (("stage", ("xe", "scst")), ("epoch_items", ("captions", "images")),
                              ("train_vocab", ("full", "captions")),
                              ("cider_tokenizer", ("ptb", "simple"))):
            if getattr(self, name) not in allowed:
                raise UserError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.grad_accum < 1 or not self.lr > 0:
            raise UserError("epochs, batch_size, grad_accum and lr must be positive")
        if self.stage == "scst" and not self.init:
            raise UserError("stage scst fine-tunes a trained captioner: give init (p2_train.py --init RUN_DIR)")
        if self.augment and self.cache_features:
            raise UserError("cache_features stores each image's tokens once, so it cannot see augmented images: "
                            "turn off augment or cache_features")

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        values = dict(values)
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UserError(f"unknown config keys: {unknown}")
        model = CaptionConfig.from_dict(coerce(CaptionConfig, values.pop("model", None) or {}))
        sections = {}
        for name, kind in (("decode", DecodeConfig), ("scst", SCSTConfig)):
            section = coerce(kind, values.pop(name, None) or {})
            unknown = sorted(set(section) - {f.name for f in dataclasses.fields(kind)})
            if unknown:
                raise UserError(f"unknown {name} keys: {unknown}")
            sections[name] = kind(**section)
        return cls(model=model, **sections, **coerce(cls, values))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def data_paths(self) -> "DataPaths":
        """Where the data, the GPT-2 weights, the encoder and the CLIPScore model come from; checked to exist."""
        if self.toy_world:
            paths = DataPaths.of_toy_world(ToyWorld(self.toy_world))
        elif self.model.encoder == "toy":
            raise UserError("this is a toy config: give the toy world's folder with --toy-world DIR")
        else:
            paths = DataPaths.of_course_data(self.data_dir, self.decoder_weights, self.model.encoder, self.clip_model)
        return paths.check()


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
                raise UserError(f"{key} must be a number, got {value!r}") from error
            if kind is int and converted[key] != float(value):  # 3.5 would silently become 3
                raise UserError(f"{key} must be a whole number, got {value!r}")
        elif kind is bool and not isinstance(value, bool):
            raise UserError(f"{key} must be true or false, got {value!r}")
    return converted


def apply_override(values: dict, assignment: str) -> None:
    """Sets `a.b=value` in `values` (changed in place): values["a"]["b"] = value, the value parsed as YAML (numbers,
    true/false, lists [1, 2], null)."""
    if "=" not in assignment:
        raise UserError(f"--set expects key=value, got {assignment!r}")
    key, text = assignment.split("=", 1)
    *sections, name = key.strip().split(".")
    target = values
    for section in sections:
        target = target.setdefault(section, {})
        if not isinstance(target, dict):
            raise UserError(f"--set {key}: {section} is not a section")
    target[name] = yaml.safe_load(text)


def load_config(path: Optional[str], overrides: List[str] = (), base: Optional[dict] = None,
                flags: Optional[dict] = None) -> TrainConfig:
    """The config of `base` (a saved config dict) and/or a YAML file, the file's values over the base's (section by
    section), then `--set` overrides, then `flags` (top-level values, None = not given)."""
    values = copy.deepcopy(base or {})  # the overrides below change nested sections in place
    if path:
        try:
            with open(path) as f:
                from_file = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as error:
            raise UserError(f"cannot read config {path}: {error}") from error
        if not isinstance(from_file, dict):
            raise UserError(f"{path} must hold a YAML mapping")
        for key, value in from_file.items():
            if isinstance(value, dict) and isinstance(values.get(key), dict):
                values[key].update(value)
            else:
                values[key] = value
    for assignment in overrides:
        apply_override(values, assignment)
    values.update({key: value for key, value in (flags or {}).items() if value is not None})
    return TrainConfig.from_dict(values)
