"""The image-conditioned captioner: a frozen ViT encoder, the frozen course GPT-2 with cross-attention to the image
tokens in chosen blocks, and PEFT (peft.py); its configuration, its one builder (build_caption_model, for training
and for load_captioner alike) and trainable-parameter accounting. Saving and loading trained checkpoints:
checkpoint.py.

Decoding (beam search) computes the image keys/values once per image and reuses them at every step:
    tokens = model.encode_images(images)                    # [B, N, D], frozen encoder
    context = model.image_context(tokens)                   # per-block (k, v), or None where no cross-attention
    context = decoder.select_batch(context, beam_index)     # e.g. repeat / reorder for beams
    logits, past = model.decode_step(ids, context, past)    # ids [B, T_new]; past from the previous step
Training: `logits = model(input_ids, model.image_tokens(batch.images))` (images, or tokens from a feature cache).
Attention maps (P3): `model.record_attention(True)`, a forward pass, then `model.attention_maps()`.
"""
import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from decoder import Decoder, GPTConfig, KeyValue, LoadReport, attention, gpt2_parameter_names, load_course_weights
from hw3.common.errors import UserError
from hw3.common.files import load_state_dict_file
from hw3.p2.encoder import ImageEncoder, load_image_encoder
from hw3.p2.peft import PEFT_KINDS, PrefixTuning, add_adapters, add_lora
from tokenizer import IGNORE_INDEX

MAX_TRAINABLE = 35_000_000  # the assignment's limit, counted on the saved checkpoint


@dataclass
class CaptionConfig:
    """Everything needed to rebuild a CaptionModel; a checkpoint's .config.json holds it (hw3/p2/checkpoint.py)."""
    encoder: str = "ViT-L/14"  # see hw3/p2/encoder.py
    encoder_layer: int = -1  # which encoder block's tokens (Python-style index; -2: the penultimate block)
    decoder: GPTConfig = field(default_factory=GPTConfig)  # sizes: decoder_model.bin's; dropout, layer_norm_eps free
    context_width: int = 768  # width of the shared projection of the image tokens, fed to every cross-attention
    cross_attn_layers: Optional[List[int]] = None  # decoder blocks with cross-attention; None = all
    cross_attn_width: int = 768  # inner width (heads * head_dim) of each cross-attention
    cross_attn_heads: int = 12
    cross_attn_dropout: float = 0.0
    peft: List[str] = field(default_factory=lambda: ["adapter"])  # any of "adapter", "prefix", "lora"; [] = none
    adapter_size: int = 64
    adapter_placement: List[str] = field(default_factory=lambda: ["attn", "mlp"])
    adapter_dropout: float = 0.0
    prefix_length: int = 10
    prefix_hidden: int = 0  # > 0: MLP reparameterisation while training (checkpoints hold the collapsed prefixes)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: List[str] = field(default_factory=lambda: ["attn.c_attn"])
    lora_qkv: str = "qv"
    max_caption_length: int = 60  # tokens, for training truncation and generation

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> "CaptionConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown CaptionConfig fields: {unknown}")
        values = dict(values)
        if isinstance(values.get("decoder"), dict):
            unknown = sorted(set(values["decoder"]) - {f.name for f in fields(GPTConfig)})
            if unknown:
                raise UserError(f"unknown decoder (GPTConfig) fields: {unknown}")
            values["decoder"] = GPTConfig(**values["decoder"])
        config = cls(**values)
        bad = sorted(set(config.peft) - set(PEFT_KINDS))
        if bad:
            raise UserError(f"unknown PEFT kinds {bad}: choose from {PEFT_KINDS}")
        return config

    @classmethod
    def from_json(cls, text: str) -> "CaptionConfig":
        return cls.from_dict(json.loads(text))


class CrossAttention(nn.Module):
    """Decoder tokens attend to image tokens (pre-LN, residual update). The output projection starts at zero, so a
    new model computes exactly the pretrained LM's logits. With `record_attention` set, each forward stores its
    attention weights [B, heads, T, N] (detached) in `attention_weights`."""

    def __init__(self, n_embd: int, context_width: int, width: int, n_head: int, dropout: float = 0.0):
        super().__init__()
        if width % n_head:
            raise UserError(f"cross-attention width {width} is not a multiple of its {n_head} heads")
        self.n_head = n_head
        self.ln_cross = nn.LayerNorm(n_embd)
        self.q_proj = nn.Linear(n_embd, width)
        self.kv_proj = nn.Linear(context_width, 2 * width)
        self.out_proj = nn.Linear(width, n_embd)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)
        self.record_attention = False
        self.attention_weights: Optional[torch.Tensor] = None

    def heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, width] -> [B, H, L, d]
        B, L, width = x.shape
        return x.view(B, L, self.n_head, width // self.n_head).transpose(1, 2)

    def context_kv(self, context: torch.Tensor) -> KeyValue:
        """Image keys and values [B, H, N, d] from projected image tokens [B, N, context_width]."""
        k, v = self.kv_proj(context).chunk(2, dim=-1)
        return self.heads(k), self.heads(v)

    def forward(self, x: torch.Tensor, context: Union[torch.Tensor, KeyValue]) -> torch.Tensor:
        if context is None:
            raise ValueError("this decoder has cross-attention: pass the image context")
        k, v = self.context_kv(context) if isinstance(context, torch.Tensor) else context
        q = self.heads(self.q_proj(self.ln_cross(x)))
        y, weights = attention(q, k.to(q.dtype), v.to(q.dtype))
        if self.record_attention:
            self.attention_weights = weights.detach()
        y = y.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.dropout(self.out_proj(y))


def vocabulary_rows(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[vocab_size] long: the row of each token id in `token_ids`, -1 for ids not in it."""
    rows = torch.full((vocab_size,), -1, dtype=torch.long, device=token_ids.device)
    rows[token_ids.long()] = torch.arange(len(token_ids), device=token_ids.device)
    return rows


class OutputVocabulary(nn.Module):
    """A subset of the vocabulary for the output layer: the logits are computed for `token_ids` only (row i of the
    logits is token token_ids[i]). A training speed-up for a language model that gives every other token no
    probability, as the toy world's tiny GPT-2 does (its configs set `train_vocab: captions`); an approximation
    for any other. Its buffers are not saved in checkpoints."""

    def __init__(self, token_ids: torch.Tensor, vocab_size: int):
        super().__init__()
        self.register_buffer("token_ids", token_ids.long(), persistent=False)
        self.register_buffer("rows", vocabulary_rows(token_ids, vocab_size), persistent=False)

    def targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Token ids -> their rows (IGNORE_INDEX stays); a token outside the subset raises ValueError."""
        rows = self.rows[targets.clamp(min=0)]
        if bool((rows[targets != IGNORE_INDEX] < 0).any()):
            raise ValueError("a target token is outside the training vocabulary")
        return torch.where(targets == IGNORE_INDEX, targets, rows)


class CaptionModel(nn.Module):
    """Frozen `encoder` and `decoder` (GPT-2 weights already loaded, or random for tests), extended in place with the
    new modules of `config`. Only the new modules are trainable; construction fails when the trainable count, while
    training or in a checkpoint, is MAX_TRAINABLE or more. `output_vocabulary` (None: all tokens) restricts the
    logits of every forward to a subset of the vocabulary, for the run that sets it (`restrict_output`)."""

    def __init__(self, config: CaptionConfig, encoder: ImageEncoder, decoder: Decoder):
        super().__init__()
        sizes = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")
        if any(getattr(decoder.config, s) != getattr(config.decoder, s) for s in sizes):
            raise UserError(f"decoder is {decoder.config}, the caption config expects {config.decoder}")
        self.config, self.encoder, self.decoder = config, encoder, decoder
        n_embd = decoder.config.n_embd
        self.image_proj = nn.Linear(encoder.width, config.context_width)
        self.image_ln = nn.LayerNorm(config.context_width)
        layers = range(decoder.config.n_layer) if config.cross_attn_layers is None else config.cross_attn_layers
        for i in layers:
            decoder.transformer.h[i].cross_attn = CrossAttention(
                n_embd, config.context_width, config.cross_attn_width, config.cross_attn_heads,
                config.cross_attn_dropout)
        if "adapter" in config.peft:
            add_adapters(decoder, config.adapter_size, config.adapter_placement, dropout=config.adapter_dropout)
        self.prefix = PrefixTuning(decoder.config, config.prefix_length, config.prefix_hidden) \
            if "prefix" in config.peft else None
        if "lora" in config.peft:
            add_lora(decoder, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets,
                     config.lora_qkv)
        frozen = {f"decoder.transformer.{name}" for name in gpt2_parameter_names(decoder.config)}
        for name, param in self.named_parameters():
            param.requires_grad = not (name in frozen or name.startswith("encoder."))
        # The limit applies to the checkpoint; the count while training (prefix MLP) is held to it as well.
        count = max(count_trainable(self), sum(t.numel() for t in trainable_state_dict(self).values()))
        if count >= MAX_TRAINABLE:
            raise UserError(f"{count:,} trainable parameters, the limit is < {MAX_TRAINABLE:,}:\n"
                            f"{parameter_table(self)}")
        self.output_vocabulary: Optional[OutputVocabulary] = None

    def restrict_output(self, token_ids: torch.Tensor) -> None:
        """From now on, logits cover `token_ids` only (see OutputVocabulary)."""
        device = self.image_proj.weight.device
        self.output_vocabulary = OutputVocabulary(token_ids.to(device), self.decoder.config.vocab_size)

    def output_token_ids(self) -> Optional[torch.Tensor]:
        """The token id of each logit row, or None when the logits cover the whole vocabulary in id order."""
        return self.output_vocabulary.token_ids if self.output_vocabulary is not None else None

    def output_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Target token ids as rows of the logits (IGNORE_INDEX stays)."""
        return self.output_vocabulary.targets(targets) if self.output_vocabulary is not None else targets

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images [B, 3, S, S] -> image tokens [B, N, D] (float32, no gradient)."""
        return self.encoder(images)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Image tokens [B, N, D] of preprocessed images [B, 3, S, S], or of tokens a feature cache already holds
        ([B, N, D], any float dtype): what a training batch carries, either way."""
        if images.dim() == 4:
            with torch.no_grad():
                return self.encode_images(images)
        return images.float()

    def image_context(self, image_tokens: torch.Tensor) -> List[Optional[KeyValue]]:
        """Per decoder block: the cross-attention's image (k, v) [B, H, N, d], or None where there is none."""
        context = self.image_ln(self.image_proj(image_tokens.to(self.image_proj.weight.dtype)))
        return [block.cross_attn.context_kv(context) if block.cross_attn is not None else None
                for block in self.decoder.transformer.h]

    def decode_step(self, input_ids: torch.Tensor, context, past=None, attention_mask=None,
                    position_ids=None) -> Tuple[torch.Tensor, List[KeyValue]]:
        """Logits [B, T, vocab] for the new tokens and the extended cache. `context`: image tokens [B, N, D] or
        (better, computed once) `image_context(...)`. Arguments as in `Decoder.forward`."""
        if isinstance(context, torch.Tensor):
            context = self.image_context(context)
        prefix_kv = self.prefix() if self.prefix is not None else None
        return self.decoder(input_ids, past=past, attention_mask=attention_mask, position_ids=position_ids,
                            context=context, prefix_kv=prefix_kv, output_ids=self.output_token_ids())

    def forward(self, input_ids: torch.Tensor, context, attention_mask=None) -> torch.Tensor:
        """Teacher-forced logits [B, T, vocab] for a whole sequence (training, attention maps); with an output
        vocabulary, [B, T, its size] (targets: `output_targets`)."""
        return self.decode_step(input_ids, context, attention_mask=attention_mask)[0]

    def train(self, mode: bool = True) -> "CaptionModel":
        super().train(mode)
        self.encoder.eval()
        return self

    def record_attention(self, enabled: bool = True) -> None:
        for block in self.decoder.transformer.h:
            if block.cross_attn is not None:
                block.cross_attn.record_attention = enabled
                block.cross_attn.attention_weights = None

    def attention_maps(self) -> Dict[int, torch.Tensor]:
        """Layer index -> the last recorded cross-attention weights [B, heads, T, N] (N = encoder tokens, CLS first:
        patch maps are `[..., encoder.n_prefix_tokens:]` reshaped to `encoder.grid`)."""
        return {i: block.cross_attn.attention_weights for i, block in enumerate(self.decoder.transformer.h)
                if block.cross_attn is not None and block.cross_attn.attention_weights is not None}


DECODER_FILE = "a GPT-2 state_dict in the course's decoder_model.bin format"
FILE_SIZES = ("n_layer", "n_embd", "vocab_size", "block_size")  # the GPTConfig fields decoder_model.bin's shapes give


def decoder_settings(config: GPTConfig) -> dict:
    """The fields of `config` that decoder_model.bin does not hold (n_head, dropout, layer_norm_eps): what a loader
    passes on top of the file's sizes."""
    return {f.name: getattr(config, f.name) for f in fields(GPTConfig) if f.name not in FILE_SIZES}


def read_decoder_config(path: str, **config_overrides) -> GPTConfig:
    """The GPTConfig of the course's decoder_model.bin at `path`: sizes from the file (n_head = n_embd // 64),
    `config_overrides` on top; a file that is not one raises UserError naming it."""
    state_dict = load_state_dict_file(path, DECODER_FILE)
    try:
        return GPTConfig.from_state_dict(state_dict, **config_overrides)
    except KeyError as error:  # GPT-2's embeddings missing
        raise UserError(f"{path}: {error.args[0]}") from None


def load_decoder_with_report(path: str, **config_overrides) -> Tuple[Decoder, LoadReport]:
    """GPT-2 from the course's decoder_model.bin (sizes from the file, `config_overrides` e.g. dropout) and the
    report of what loaded; a file that is not one raises UserError naming it."""
    state_dict = load_state_dict_file(path, DECODER_FILE)
    try:
        decoder = Decoder(GPTConfig.from_state_dict(state_dict, **config_overrides))
        return decoder, load_course_weights(decoder, state_dict)
    except (KeyError, ValueError) as error:  # GPT-2's keys missing, or of other shapes
        raise UserError(f"{path}: {error.args[0]}") from None


def load_decoder(path: str, **config_overrides) -> Decoder:
    """The decoder of `load_decoder_with_report`."""
    return load_decoder_with_report(path, **config_overrides)[0]


def build_caption_model(config: CaptionConfig, decoder_weights: Optional[str], device="cpu",
                        pretrained_encoder: bool = True, encoder: Optional[str] = None) -> CaptionModel:
    """THE builder of a captioner, for training (hw3.p2.training) and for loading a checkpoint (load_captioner): a
    new CaptionModel of `config` on `device`. GPT-2 is loaded from `decoder_weights` (a decoder_model.bin path; None:
    random weights, for tests) with every decoder setting the file does not hold taken from config.decoder
    (decoder_settings: n_head, dropout, layer_norm_eps); its sizes must be config.decoder's. The encoder is
    `encoder or config.encoder` (pretrained_encoder=False: random weights, for tests).

    The decoder is built before the encoder and both before the new modules: the seeded RNG they draw from in this
    order gives a training run its initial weights."""
    if decoder_weights is None:
        decoder = Decoder(config.decoder)
    else:
        decoder = load_decoder(decoder_weights, **decoder_settings(config.decoder))
    image_encoder = load_image_encoder(encoder or config.encoder, device, pretrained_encoder, config.encoder_layer)
    return CaptionModel(config, image_encoder, decoder).to(device)


# ---- parameter accounting -------------------------------------------------------------------------------------------

def trainable_state_dict(model: CaptionModel, collapse_prefix: bool = True) -> Dict[str, torch.Tensor]:
    """The tensors a checkpoint holds: every trainable parameter, with reparameterised prefixes collapsed (keep them
    with collapse_prefix=False, to resume training with the prefix MLP)."""
    tensors = {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}
    if collapse_prefix and model.prefix is not None and model.prefix.reparameterised:
        tensors = {name: t for name, t in tensors.items() if not name.startswith("prefix.")}
        with torch.no_grad():
            tensors["prefix.prefixes"] = model.prefix.collapsed().detach()
    return tensors


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_table(model: CaptionModel) -> str:
    """Trainable parameters per module (layers grouped as h.*), with totals."""
    groups: Dict[str, List[int]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            group = re.sub(r"\.h\.\d+\.", ".h.*.", name.rsplit(".", 1)[0] if "." in name else name)
            groups.setdefault(group, []).append(param.numel())
    lines = [f"{'trainable module':<50} {'tensors':>7} {'parameters':>12}"]
    lines += [f"{group:<50} {len(sizes):>7} {sum(sizes):>12,}" for group, sizes in groups.items()]
    trainable = sum(sum(sizes) for sizes in groups.values())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    saved = sum(t.numel() for t in trainable_state_dict(model).values())
    lines.append(f"{'total trainable (while training)':<58} {trainable:>12,}")
    lines.append(f"{'in a checkpoint':<58} {saved:>12,}")
    lines.append(f"{'frozen':<58} {frozen:>12,}")
    return "\n".join(lines)
