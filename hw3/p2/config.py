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

from decoder import GPTConfig
from hw3.common.errors import UserError
from hw3.common.layout import CourseLayout
from hw3.p2.generation import DecodeConfig
from hw3.p2.model import CaptionConfig


def option(default, help: str, factory=None):
    """A config field with its --help text (p2_train.py lists the fields from this metadata)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


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

    @classmethod
    def of_course_data(cls, data_dir: str, decoder: str, encoder: str, clip_model: str) -> "DataPaths":
        """The course layout around p2_data `data_dir` (hw3.common.layout.CourseLayout)."""
        layout = CourseLayout.of_p2_data(data_dir)
        return cls(str(layout.p2_annotations("train")), str(layout.p2_annotations("val")),
                   str(layout.p2_images("train")), str(layout.p2_images("val")), decoder, encoder, clip_model)

    @property
    def description(self) -> str:
        return f"data {os.path.dirname(self.train_json)}"

    def check(self) -> "DataPaths":
        """Raises UserError naming the first input that does not exist."""
        for name in ("train_json", "val_json", "train_images", "val_images", "decoder"):
            if not os.path.exists(getattr(self, name)):
                raise UserError(f"{name} not found: {getattr(self, name)} (set data_dir / decoder_weights, or "
                                "p2_train.py --toy-world DIR)")
        return self


@dataclass
class SCSTConfig:
    """Self-critical sequence training (stage: scst, hw3/p2/scst.py): the `scst:` section of a config."""
    samples: int = option(3, "candidate captions per image and step: the K best hypotheses of a beam-K search "
                             "with hw3_2.sh's length penalty (the baseline is the mean of the other K - 1)")
    max_length: int = option(0, "tokens per candidate, the end token included; 0 = decode.max_length")
    end_token: bool = option(True, "reward over the words + an end word: a caption ending '... on a' matches no "
                                   "reference")
    clip_weight: float = option(1.0, "reward = CIDEr-D + clip_weight * CLIPScore (of clip_model, 2.5 * max(cos, "
                                     "0)); 0 = CIDEr-D only")

    def __post_init__(self):
        if self.samples < 2:
            raise UserError("scst.samples must be >= 2 (the baseline is the mean of the other candidates)")
        if self.max_length < 0 or self.clip_weight < 0:
            raise UserError("scst.max_length and scst.clip_weight must be >= 0")


@dataclass
class TrainConfig:
    """Everything a training run needs besides its run folder's state; saved in the run folder (config.yaml,
    resume.pt). Each field's help text is what `p2_train.py --help` lists."""
    model: CaptionConfig = option(None, "the captioner (hw3.p2.model.CaptionConfig)", CaptionConfig)
    decode: DecodeConfig = option(None, "the validation captions' decoding (hw3.p2.generation.DecodeConfig)",
                                  DecodeConfig)
    scst: SCSTConfig = option(None, "the self-critical stage (used by stage: scst)", SCSTConfig)
    stage: str = option("xe", "'xe': cross-entropy on the references; 'scst': self-critical training of the "
                              "`init` model")
    init: Optional[str] = option(None, "a trained checkpoint to start from (p2_train.py --init RUN sets it)")
    data_dir: str = option("hw3_data/p2_data", "p2_data in the course layout: images/{train,val}/*.jpg, "
                                               "train.json, val.json")
    decoder_weights: str = option("hw3_data/p2_data/decoder_model.bin",
                                  "the course's GPT-2 (its sizes set model.decoder)")
    clip_model: str = option("ViT-B/32", "the CLIPScore model, as the course's scorer (a CLIP name or file)")
    epochs: int = option(5, "epochs to train")
    batch_size: int = option(32, "per process and micro-step; the effective batch is batch_size * grad_accum * "
                                 "processes")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = option(0.01, "AdamW weight decay of the matrices")
    warmup_ratio: float = option(0.05, "linear warmup over this fraction of the optimizer steps, then cosine to 0")
    grad_clip: float = option(1.0, "max gradient norm; 0 = off")
    label_smoothing: float = option(0.0, "of the cross-entropy (stage xe)")
    amp: bool = option(True, "fp16 autocast + GradScaler on CUDA (never bf16: a 2080 Ti has none); CPU runs fp32")
    epoch_items: str = option("captions", "'captions': every caption once per epoch; 'images': one caption per "
                                          "image, drawn per epoch")
    train_vocab: str = option("full", "'captions': logits over the training captions' tokens only, for the whole "
                                      "run (exact for an LM that gives other tokens no probability, as the toy "
                                      "world's); 'full': all tokens")
    cpu_threads: int = option(0, "torch threads on CPU; 0 = PyTorch's default")
    max_steps: int = option(0, "stop after this many optimizer steps (0 = all epochs); the schedule ends there")
    seed: int = option(0, "seeds the model's new weights, the data order and each step's randomness")
    cache_features: bool = option(False, "encode every image once, keep the tokens (fp16) in cache_dir, train "
                                         "from them")
    cache_dir: str = option("$HW3_CACHE/features", "shared by runs with the same encoder and images; a leading "
                                                   "$HW3_CACHE is that variable's value when the cache is used, else "
                                                   "~/.cache/dlcv-hw3 (hw3.p2.data.resolve_cache_dir)")
    num_workers: int = option(4, "image-reading processes (cached features are read in the main process)")
    val_every: int = option(0, "optimizer steps between validations; 0 = after every epoch")
    val_images: int = option(0, "validate on the first N val images only (0 = all; CIDEr then uses their "
                                "references only): quick trial runs")
    val_batch_size: int = option(64, "images per validation batch")
    cider_tokenizer: str = option("ptb", "'ptb' as the course's scorer (needs Java), or 'simple' (pure Python)")
    log_every: int = option(20, "optimizer steps between training-loss lines in log.jsonl")
    out: str = option("runs/p2", "the run folder")

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

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        values = dict(values)
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UserError(f"unknown config keys: {unknown}")
        model = coerce(CaptionConfig, values.pop("model", None) or {})
        if isinstance(model.get("decoder"), dict):  # a section of its own: `1e-6` is a string to YAML there too
            model["decoder"] = coerce(GPTConfig, model["decoder"])
        model = CaptionConfig.from_dict(model)
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
        if self.model.encoder == "toy":
            raise UserError("this is a toy config: give the toy world's folder with p2_train.py --toy-world DIR")
        return DataPaths.of_course_data(self.data_dir, self.decoder_weights, self.model.encoder,
                                        self.clip_model).check()


def field_help(kind) -> str:
    """`name: default  help` lines of a config dataclass's fields (their metadata), for --help."""
    lines = []
    for item in dataclasses.fields(kind):
        default = item.default if item.default is not dataclasses.MISSING else "(section)"
        lines.append(f"    {item.name}: {default}  # {item.metadata.get('help', '')}")
    return "\n".join(lines)


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
