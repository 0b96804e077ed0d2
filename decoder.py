"""The course's GPT-2 small decoder, re-written: config, model, loading `decoder_model.bin` and saving in its format.

Module names are exactly GPT-2's (`transformer.wte`, `transformer.h.{i}.attn.c_attn`, ...), so the course file loads
by name. Later additions plug into slots that default to no-ops, never by renaming GPT-2's modules:

- `block.cross_attn`: None, or a module `cross_attn(x, context) -> update` (x: the residual stream [B, T, C]; it
  applies its own LayerNorm); the block adds the update to the residual stream between self-attention and MLP.
  `context` is whatever `Decoder.forward(context=...)` gets (one object for every block, or a list with one
  entry per block), e.g. image tokens or image keys/values computed once per image.
- `block.attn_adapter` / `block.mlp_adapter`: None, or a module `adapter(y) -> y'` applied to the self-attention
  / MLP output before it is added to the residual stream (the adapter includes its own skip connection).
- `prefix_kv` argument of `Decoder.forward`: per-layer key/value prefixes that every query may attend to.
- LoRA replaces `attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj` (nn.Linear) in place, keeping the names.
"""
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

KeyValue = Tuple[torch.Tensor, torch.Tensor]  # (key, value), each [B, n_head, T, head_dim]
MASK_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of HF GPT-2, not parameters
CONV1D_WEIGHTS = (".c_attn.weight", ".c_fc.weight", ".c_proj.weight")  # stored [in, out] in the course file


@dataclass
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257
    block_size: int = 1024
    dropout: float = 0.0  # embedding, attention and residual dropout (GPT-2 trained with 0.1)
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_state_dict(cls, state_dict: Dict[str, torch.Tensor], **overrides) -> "GPTConfig":
        """Sizes read from a course-format state_dict's shapes; n_head = n_embd // 64 unless given. A state_dict
        without GPT-2's embeddings raises KeyError naming what is missing."""
        state_dict = _strip_transformer_prefix(state_dict)
        absent = [key for key in ("wte.weight", "wpe.weight") if key not in state_dict]
        if absent:
            raise KeyError(f"not a GPT-2 state_dict in the course's layout: no {' or '.join(absent)} among its "
                           f"{len(state_dict)} keys (e.g. {sorted(state_dict)[:3]})")
        vocab_size, n_embd = state_dict["wte.weight"].shape
        layers = {int(key.split(".")[1]) for key in state_dict if key.startswith("h.")}
        sizes = dict(n_layer=len(layers), n_embd=n_embd, n_head=max(1, n_embd // 64), vocab_size=vocab_size,
                     block_size=state_dict["wpe.weight"].shape[0])
        sizes.update(overrides)
        return cls(**sizes)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU, the tanh approximation (torch >= 1.12 has it built in)."""
    return F.gelu(x, approximate="tanh")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor] = None,
              dropout: Optional[nn.Module] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention. q [B,H,T,d], k/v [B,H,S,d], key_mask broadcastable to [B,H,T,S], True = attend.

    Masked scores get the dtype's minimum rather than -inf, so a row with nothing to attend to (a padding query)
    gives a uniform average instead of NaN. Returns (output [B,H,T,d], weights [B,H,T,S]).
    """
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min)
    weights = F.softmax(scores.float(), dim=-1).to(q.dtype)
    return (dropout(weights) if dropout is not None else weights) @ v, weights


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # fused q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, C] -> [B, H, T, d]
        B, T, C = x.shape
        return x.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, past: Optional[KeyValue] = None,
                prefix: Optional[KeyValue] = None) -> Tuple[torch.Tensor, KeyValue]:
        """key_mask [B or 1, 1, T, S_total] covers prefix + past + current keys. Returns (output, present (k, v))
        where present holds past + current keys/values only: prefixes are passed again at every step."""
        q, k, v = (self.split_heads(t) for t in self.c_attn(x).split(x.size(-1), dim=2))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        present = (k, v)
        if prefix is not None:
            prefix_k, prefix_v = (t.to(k.dtype).expand(k.size(0), -1, -1, -1) for t in prefix)
            k, v = torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)
        y, _ = attention(q, k, v, key_mask, self.attn_dropout)
        y = y.transpose(1, 2).reshape(x.shape)
        return self.resid_dropout(self.c_proj(y)), present


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(gelu_tanh(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        # Slots for later additions (see the module docstring); None = plain GPT-2.
        self.cross_attn: Optional[nn.Module] = None
        self.attn_adapter: Optional[nn.Module] = None
        self.mlp_adapter: Optional[nn.Module] = None

    def forward(self, x, key_mask, past=None, prefix=None, context=None) -> Tuple[torch.Tensor, KeyValue]:
        y, present = self.attn(self.ln_1(x), key_mask, past, prefix)
        x = x + (self.attn_adapter(y) if self.attn_adapter is not None else y)
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, context)
        y = self.mlp(self.ln_2(x))
        x = x + (self.mlp_adapter(y) if self.mlp_adapter is not None else y)
        return x, present


class Decoder(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module):  # GPT-2's init, for models trained from scratch (tests, toy world)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, past: Optional[Sequence[KeyValue]] = None,
                attention_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                context=None, prefix_kv: Optional[Sequence[KeyValue]] = None, use_cache: bool = True,
                output_ids: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[List[KeyValue]]]:
        """Logits for `input_ids` [B, T] and the new key/value cache.

        past: the cache returned by the previous call (one (k, v) per layer, [B, H, T_past, d]), or None.
        attention_mask: [B, T_past + T], 1 = real token, 0 = padding (padding keys are never attended to);
            None = all real. Positions default to the count of real tokens before each one (so left and right padding
            both work); pass position_ids [B, T] to override.
        context: given to every block's cross_attn (a list/tuple = one entry per block); ignored without cross_attn.
        prefix_kv: one (k, v) per layer, each [B or 1, H, P, d], attended by every query; not part of the cache.
        output_ids: logits for these token ids only ([B, T, len(output_ids)], in their order); None = all.
        Returns (logits [B, T, vocab] float, list of per-layer (k, v) [B, H, T_past + T, d] or None).
        """
        B, T = input_ids.shape
        past_len = past[0][0].size(2) if past is not None else 0
        if past_len + T > self.config.block_size:
            raise ValueError(f"sequence of {past_len + T} tokens exceeds block_size {self.config.block_size}")
        device = input_ids.device
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past_len, past_len + T, device=device).unsqueeze(0)
            else:
                position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)[:, -T:]
        # key_mask [B or 1, 1, T, P + past_len + T]: causal over the sequence, prefixes always visible.
        key_mask = torch.ones(T, past_len + T, dtype=torch.bool, device=device).tril(diagonal=past_len)[None, None]
        if attention_mask is not None:
            if attention_mask.shape != (B, past_len + T):
                raise ValueError(f"attention_mask must be [B, T_past + T] = {[B, past_len + T]}, "
                                 f"got {list(attention_mask.shape)}")
            key_mask = key_mask & attention_mask.bool()[:, None, None, :]
        if prefix_kv is not None:
            n_prefix = prefix_kv[0][0].size(2)
            key_mask = torch.cat([key_mask.new_ones(key_mask.shape[:3] + (n_prefix,)), key_mask], dim=3)

        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(position_ids))
        presents = []
        for i, block in enumerate(self.transformer.h):
            block_context = context[i] if isinstance(context, (list, tuple)) else context
            x, present = block(x, key_mask, past[i] if past is not None else None,
                               prefix_kv[i] if prefix_kv is not None else None, block_context)
            presents.append(present)
        head = self.lm_head.weight if output_ids is None else self.lm_head.weight[output_ids]
        logits = F.linear(self.transformer.ln_f(x), head).float()
        return logits, (presents if use_cache else None)


def select_batch(nested, index: torch.Tensor):
    """Picks rows `index` along dim 0 of every tensor in a nested list/tuple (a cache, a context), e.g. to reorder
    beams. Non-tensor leaves (None) are kept."""
    if isinstance(nested, torch.Tensor):
        return nested.index_select(0, index)
    if isinstance(nested, (list, tuple)):
        return type(nested)(select_batch(item, index) for item in nested)
    return nested


# ---- the course file ------------------------------------------------------------------------------------------------

@dataclass
class LoadReport:
    loaded: List[str] = field(default_factory=list)  # GPT-2 parameters copied from the file
    ignored: List[str] = field(default_factory=list)  # mask buffers
    unexpected: List[str] = field(default_factory=list)  # keys the decoder has no use for

    def __str__(self):
        text = f"decoder weights: {len(self.loaded)} tensors loaded, {len(self.ignored)} mask buffers ignored"
        return text + (f", unexpected keys: {self.unexpected}" if self.unexpected else "")


def gpt2_parameter_names(config: GPTConfig) -> List[str]:
    """GPT-2's parameter names relative to `transformer`, in the course file's order."""
    names = ["wte.weight", "wpe.weight"]
    for i in range(config.n_layer):
        for module in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            names += [f"h.{i}.{module}.weight", f"h.{i}.{module}.bias"]
    return names + ["ln_f.weight", "ln_f.bias"]


def _strip_transformer_prefix(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Accepts a full GPT2LMHeadModel state_dict (`transformer.` prefix) as well as the course's layout."""
    if "wte.weight" not in state_dict and "transformer.wte.weight" in state_dict:
        return {key[len("transformer."):] if key.startswith("transformer.") else key: value
                for key, value in state_dict.items()}
    return state_dict


def load_course_weights(decoder: Decoder, source) -> LoadReport:
    """Copies GPT-2's weights from `source` (a path to decoder_model.bin or a state_dict already loaded) into
    `decoder`. Every GPT-2 parameter must be in the file (missing ones raise KeyError naming them); a shape mismatch
    raises ValueError naming the key; mask buffers are ignored; other keys are listed in the report.
    Conv1D-style weights ([in, out]) are transposed for nn.Linear. Works on a decoder already fitted with PEFT."""
    state_dict = torch.load(source, map_location="cpu") if isinstance(source, str) else source
    state_dict = _strip_transformer_prefix(state_dict)
    expected = gpt2_parameter_names(decoder.config)
    missing = [name for name in expected if name not in state_dict]
    if missing:
        raise KeyError(f"decoder weights lack {len(missing)} GPT-2 parameters: {missing}")
    report = LoadReport()
    expected_set = set(expected)
    for key in state_dict:
        if key.endswith(MASK_BUFFER_SUFFIXES):
            report.ignored.append(key)
        elif key not in expected_set and key != "lm_head.weight":  # lm_head is wte (tied)
            report.unexpected.append(key)
    with torch.no_grad():
        for name in expected:
            tensor = state_dict[name]
            if name.endswith(CONV1D_WEIGHTS):
                tensor = tensor.t()
            param = decoder.transformer.get_parameter(name)
            if param.shape != tensor.shape:
                raise ValueError(f"decoder weight {name}: file has shape {list(tensor.shape)} (after transposing "
                                 f"Conv1D weights), model expects {list(param.shape)}")
            param.copy_(tensor)
            report.loaded.append(name)
    return report


def course_state_dict(decoder: Decoder, mask_buffers: bool = False) -> Dict[str, torch.Tensor]:
    """The decoder's GPT-2 weights in the course file's format (keys relative to `transformer`, Conv1D weights
    [in, out], GPT-2's parameters only; with mask_buffers, also the `h.{i}.attn.bias` causal masks HF GPT-2 saved).
    `torch.save(course_state_dict(model), "decoder_model.bin")` makes a file `load_course_weights` reads back."""
    state_dict = {}
    block_size = decoder.config.block_size
    for name in gpt2_parameter_names(decoder.config):
        tensor = decoder.transformer.get_parameter(name).detach().cpu()
        state_dict[name] = (tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor).contiguous().clone()
        if mask_buffers and name.endswith("attn.c_attn.weight"):
            layer = name[: -len(".c_attn.weight")]
            state_dict[layer + ".bias"] = torch.ones(block_size, block_size, dtype=torch.uint8).tril()[None, None]
            state_dict[layer + ".masked_bias"] = torch.tensor(-1e4)
    return state_dict
