"""Optimisation pieces shared by P2 training and the toy world's model training: AdamW parameter groups and the
warmup + cosine learning-rate schedule."""
import math
from typing import Callable, Iterable

import torch
import torch.nn as nn


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
