"""The grammar of a P2 image encoder's name (CaptionConfig.encoder, `--encoder`, a checkpoints.json entry's config),
read in this one place: `parse_encoder_name(text)` gives an EncoderName, whose `text` (and str()) spells the name back
exactly as given. Every reader of a name (the encoder loader, the feature cache's key, the downloads, the preflight,
the report) asks this module, so they all agree on which weights a name means.

Three kinds:
- "clip": an OpenAI CLIP model of the `clip` package by its name, e.g. "ViT-L/14", "ViT-L/14@336px" (the `@` there
  is part of the name: a CLIP name is never split).
- "timm": "timm:MODEL", "timm:MODEL.TAG", "timm:MODEL@FILE" or "timm:MODEL.TAG@FILE": a timm architecture, its
  pretrained tag ("": timm's default tag) and a local weights file ("": the published weights). MODEL and TAG are
  split at the first "." as timm's own split_model_name_tag does. FILE is everything after the first "@": timm's
  architecture names and tags never contain "@" or "." (timm 0.9.10's 1,019 architectures and 1,286 pretrained
  names), a path may contain both, so "timm:vit_base_patch16_clip_quickgelu_224.openai@/w@2/clip.v1.pt" names the
  file "/w@2/clip.v1.pt".
- "file": anything else is the path of a local state_dict in OpenAI CLIP's layout, dots and "@" included.
"""
from dataclasses import dataclass
from typing import List

from hw3.common.errors import UserError

KINDS = ("clip", "timm", "file")
TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class EncoderName:
    """One encoder name, parsed. `model`: the CLIP name (kind "clip") or timm's architecture without its tag (kind
    "timm"); `tag`: timm's pretrained tag, "" for its default; `file`: the local weights file (kind "file", or a
    timm name's "@FILE"), "" when the weights are the ones the name publishes."""
    kind: str
    model: str = ""
    tag: str = ""
    file: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"encoder name kind {self.kind!r} is not one of {KINDS}")

    @property
    def timm_model(self) -> str:
        """timm's model name, "MODEL.TAG" or "MODEL": what timm.create_model and hw3.common.download take."""
        return f"{self.model}.{self.tag}" if self.tag else self.model

    @property
    def text(self) -> str:
        """The name as written: parse_encoder_name(name.text) == name."""
        if self.kind == "clip":
            return self.model
        if self.kind == "file":
            return self.file
        return TIMM_PREFIX + self.timm_model + (f"@{self.file}" if self.file else "")

    def __str__(self) -> str:
        return self.text


def clip_model_names() -> List[str]:
    import clip  # imported here: the names are clip's own table (clip.clip._MODELS), and clip imports torch
    return clip.available_models()


def timm_encoder(model_name: str, file: str = "") -> EncoderName:
    """The timm encoder of timm model name `model_name` ("MODEL" or "MODEL.TAG", as hw3.common.manifest's timm
    backbones spell it), with weights `file` ("": the published ones). Raises UserError for an empty MODEL or TAG."""
    model, dot, tag = model_name.partition(".")
    if not model or (dot and not tag):
        raise UserError(f"{TIMM_PREFIX}{model_name}: a timm encoder is timm:MODEL or timm:MODEL.TAG, optionally "
                        "followed by @FILE (e.g. timm:vit_so400m_patch14_siglip_384.webli)")
    return EncoderName("timm", model, tag, file)


def parse_encoder_name(text: str) -> EncoderName:
    """`text` parsed by the module docstring's grammar. Raises UserError for a malformed timm name (an empty MODEL,
    TAG or FILE); any other text is a CLIP name or a file path."""
    if text.startswith(TIMM_PREFIX):
        model_name, at, file = text[len(TIMM_PREFIX):].partition("@")  # the first "@": MODEL.TAG never has one
        if at and not file:
            raise UserError(f"{text}: nothing after '@' (timm:MODEL.TAG@FILE names a local weights file)")
        return timm_encoder(model_name, file)
    if text in clip_model_names():
        return EncoderName("clip", model=text)
    return EncoderName("file", file=text)
