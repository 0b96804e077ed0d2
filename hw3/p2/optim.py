"""Optimisation pieces shared by P2 training and the toy world's model training: AdamW parameter groups, the
warmup + cosine learning-rate schedule, and training over a subset of the vocabulary."""
import math
from contextlib import contextmanager
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer import IGNORE_INDEX


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor per optimizer step: linear warmup to 1, then cosine to 0 at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int,
                            total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps))


def adamw(named_parameters: Iterable, lr: float, weight_decay: float, betas=(0.9, 0.999),
          no_decay: Callable[[str, nn.Parameter], bool] = lambda name, p: p.dim() < 2) -> torch.optim.AdamW:
    """AdamW over the parameters that require gradients; those for which `no_decay(name, p)` holds (by default
    biases and LayerNorm weights, the 1-d ones) get no weight decay."""
    params = [(name, p) for name, p in named_parameters if p.requires_grad]
    groups = [{"params": [p for name, p in params if not no_decay(name, p)], "weight_decay": weight_decay},
              {"params": [p for name, p in params if no_decay(name, p)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def vocabulary_rows(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[vocab_size] long: the row of each token id in `token_ids`, -1 for ids not in it."""
    rows = torch.full((vocab_size,), -1, dtype=torch.long, device=token_ids.device)
    rows[token_ids.long()] = torch.arange(len(token_ids), device=token_ids.device)
    return rows


class VocabularyHead(nn.Module):
    """A tied output layer restricted to a vocabulary subset: logits [..., len(token_ids)] = hidden @ rows.T, where
    rows = weight[token_ids] (weight: the full [vocab, C] embedding), or weight itself when token_ids is None (a
    weight that already holds just the subset's rows, as a trained-rows-only embedding does)."""

    def __init__(self, weight: nn.Parameter, token_ids: Optional[torch.Tensor] = None):
        super().__init__()
        self.weight = weight
        self.token_ids = token_ids

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = self.weight if self.token_ids is None else self.weight[self.token_ids]
        return F.linear(hidden, rows)


class VocabularySubset:
    """Training over a subset of the vocabulary: `head(decoder)` swaps the output layer for the subset's while a
    forward pass runs, `targets(t)` maps token ids to their rows in it (IGNORE_INDEX stays)."""

    def __init__(self, token_ids: torch.Tensor, vocab_size: int, device=None):
        self.token_ids = token_ids.to(device)
        self.rows = vocabulary_rows(self.token_ids, vocab_size)

    @contextmanager
    def head(self, decoder: nn.Module):
        full = decoder.lm_head
        decoder.lm_head = VocabularyHead(full.weight, self.token_ids)
        try:
            yield
        finally:
            decoder.lm_head = full

    def targets(self, targets: torch.Tensor) -> torch.Tensor:
        rows = self.rows[targets.clamp(min=0)]
        if bool((rows[targets != IGNORE_INDEX] < 0).any()):
            raise ValueError("a target token is outside the training vocabulary")
        return torch.where(targets == IGNORE_INDEX, targets, rows)
