"""Optimizer and learning-rate schedule: SGD or AdamW over head and backbone
parameter groups, linear warm-up then cosine decay, stepped per batch."""
import math
from typing import List

import torch
from torch import nn


def param_groups(model: nn.Module, lr: float, backbone_lr: float, weight_decay: float) -> List[dict]:
    """Head (`fc`) and backbone groups with their own learning rates. Weight
    decay applies to conv and linear weights only, not to norm parameters or
    biases (decaying those only hurts)."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "head" if name.startswith("fc.") else "backbone"
        decay = p.ndim > 1
        key = (part, decay)
        if key not in groups:
            groups[key] = {
                "params": [], "lr": lr if part == "head" else backbone_lr,
                "weight_decay": weight_decay if decay else 0.0, "name": f"{part}{'' if decay else '_no_decay'}",
            }
        groups[key]["params"].append(p)
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen")
    return list(groups.values())


def make_optimizer(name: str, groups: List[dict], momentum: float = 0.9) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=groups[0]["lr"])
    raise ValueError(f"unknown optimizer {name!r}: expected 'sgd' or 'adamw'")


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  warmup_start: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Each group's lr ramps linearly from warmup_start x lr to lr over
    warmup_steps, then follows a cosine to zero at total_steps."""
    if total_steps < 1:
        raise ValueError(f"the schedule needs at least one step, got {total_steps}")
    warmup_steps = min(warmup_steps, total_steps - 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_start + (1.0 - warmup_start) * step / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
