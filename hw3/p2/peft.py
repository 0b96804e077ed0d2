"""Parameter-efficient fine-tuning of the frozen GPT-2 decoder, written here: bottleneck adapters, prefix tuning, and
LoRA (through loralib). Each `add_*` function fits a Decoder in place, using the slots decoder.py provides, and leaves
the decoder's output unchanged at initialisation (zero-init up-projection, zero-init LoRA B); prefix tuning changes
the output from the start, as prefixes do.

LoRA layers are built with `merge_weights=False`: loralib 0.1.2 would otherwise add B@A into the frozen weight on
`.eval()` and subtract it on `.train()`, so every validation would leave the frozen weight changed by float rounding,
and a resumed run (which reads the frozen weight fresh from decoder_model.bin) would differ from the uninterrupted one.
Unmerged, the frozen weights never change and B(A x) is added in every forward (rank 8-16: a small cost).
"""
from typing import List, Sequence

import loralib as lora
import torch
import torch.nn as nn

from decoder import Decoder, GPTConfig, KeyValue, gelu_tanh
from hw3.common.errors import UserError

PEFT_KINDS = ("adapter", "prefix", "lora")
LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


# ---- (a) bottleneck adapters (Houlsby et al., 2019) ----------------------------------------------------------------

class Adapter(nn.Module):
    """y + up(gelu(down(y))): a bottleneck with its own skip connection; `up` starts at zero, so it starts as identity."""

    def __init__(self, n_embd: int, bottleneck: int, dropout: float = 0.0):
        super().__init__()
        self.down = nn.Linear(n_embd, bottleneck)
        self.up = nn.Linear(bottleneck, n_embd)
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up(self.dropout(gelu_tanh(self.down(y))))


def add_adapters(decoder: Decoder, bottleneck: int, placement: Sequence[str] = ("attn", "mlp"),
                 dropout: float = 0.0) -> None:
    """Adapters in `block.attn_adapter` and/or `block.mlp_adapter` of every block."""
    unknown = set(placement) - {"attn", "mlp"}
    if unknown or not placement:
        raise UserError(f"adapter placement must be a non-empty subset of ('attn', 'mlp'), got {list(placement)}")
    for block in decoder.transformer.h:
        for where in placement:
            setattr(block, f"{where}_adapter", Adapter(decoder.config.n_embd, bottleneck, dropout))


# ---- (b) prefix tuning (Li & Liang, 2021) ---------------------------------------------------------------------------

class PrefixTuning(nn.Module):
    """Learned key/value prefixes for every layer's self-attention (`Decoder.forward(prefix_kv=...)`).

    Plain: one parameter `prefixes` [n_layer, 2, length, n_embd]. With `hidden` > 0 (training only), the prefixes are
    reparameterised as MLP(embedding), which trains more stably; `collapse()` then replaces the MLP by the plain
    prefixes it computes, which is what checkpoints hold (`collapsed()` computes them without changing the module).
    """

    def __init__(self, config: GPTConfig, length: int, hidden: int = 0):
        super().__init__()
        self.n_layer, self.n_head, self.n_embd, self.length = config.n_layer, config.n_head, config.n_embd, length
        shape = (config.n_layer, 2, length, config.n_embd)
        if hidden > 0:
            self.embedding = nn.Parameter(torch.randn(length, config.n_embd) * 0.02)
            self.mlp = nn.Sequential(nn.Linear(config.n_embd, hidden), nn.Tanh(),
                                     nn.Linear(hidden, 2 * config.n_layer * config.n_embd))
            self.prefixes = None
        else:
            self.prefixes = nn.Parameter(torch.randn(shape) * 0.02)

    @property
    def reparameterised(self) -> bool:
        return self.prefixes is None

    def collapsed(self) -> torch.Tensor:
        """The plain prefixes [n_layer, 2, length, n_embd]."""
        if not self.reparameterised:
            return self.prefixes
        out = self.mlp(self.embedding)  # [length, n_layer * 2 * n_embd]
        return out.view(self.length, self.n_layer, 2, self.n_embd).permute(1, 2, 0, 3)

    @torch.no_grad()
    def collapse(self) -> None:
        if self.reparameterised:
            prefixes = self.collapsed().detach().clone()
            del self.embedding, self.mlp
            self.prefixes = nn.Parameter(prefixes)

    def forward(self) -> List[KeyValue]:
        """Per-layer (key, value), each [1, n_head, length, head_dim] (the decoder expands the batch dimension)."""
        prefixes = self.collapsed().view(self.n_layer, 2, self.length, self.n_head, self.n_embd // self.n_head)
        prefixes = prefixes.transpose(2, 3).unsqueeze(2)  # [n_layer, 2, 1, H, length, d]
        return [(layer[0], layer[1]) for layer in prefixes]


# ---- (c) LoRA (Hu et al., 2021) through loralib ---------------------------------------------------------------------

def add_lora(decoder: Decoder, rank: int, alpha: float, dropout: float = 0.0,
             targets: Sequence[str] = ("attn.c_attn",), qkv: str = "qv") -> None:
    """Replaces the chosen nn.Linear projections (names from LORA_TARGETS) of every block by loralib layers with
    the same names and the same frozen weights. GPT-2's fused q/k/v projection `attn.c_attn` becomes a
    `lora.MergedLinear` adapting only the parts named in `qkv` (e.g. "qv", as in the LoRA paper)."""
    unknown = set(targets) - set(LORA_TARGETS)
    if unknown or not targets:
        raise UserError(f"LoRA targets must be a non-empty subset of {LORA_TARGETS}, got {list(targets)}")
    if not qkv or set(qkv) - set("qkv"):
        raise UserError(f"qkv must name some of 'q', 'k', 'v', got {qkv!r}")
    for block in decoder.transformer.h:
        for target in targets:
            parent_name, name = target.split(".")
            parent = getattr(block, parent_name)
            old = getattr(parent, name)
            kwargs = dict(r=rank, lora_alpha=alpha, lora_dropout=dropout, merge_weights=False)
            if target == "attn.c_attn":
                new = lora.MergedLinear(old.in_features, old.out_features,
                                        enable_lora=[part in qkv for part in "qkv"], **kwargs)
            else:
                new = lora.Linear(old.in_features, old.out_features, **kwargs)
            with torch.no_grad():
                new.weight.copy_(old.weight)
                new.bias.copy_(old.bias)
            new.train(old.training)
            setattr(parent, name, new.to(old.weight.device, old.weight.dtype))

