"""Optimizer and learning-rate schedules shared by pretraining, SFT and DPO.

AdamW, the optimizer of the Nanotron config in the authors' repository README (the report's text
names no optimizer); the recipes take its betas, eps, weight decay and clipping from there. Which
parameters decay is our choice (that config lists no exclusions): only the matrices of the blocks
(and an untied output head), never norms and embeddings unless the recipe asks for it. The
schedule is a multiplier of the peak learning rate per optimizer step, for LambdaLR or a
hand-written loop.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from zagreus.recipe import OptimizerSection, ScheduleSection


def _is_no_decay(name: str, param: torch.Tensor) -> bool:
    # Norm gains and biases are vectors; embeddings are looked up, not multiplied, so decaying
    # them only shrinks rare tokens (a tied output head shares the embedding's fate).
    return param.ndim < 2 or "embed_tokens" in name


def param_groups(model: nn.Module, weight_decay: float, decay_norms_and_embeddings: bool = False) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # shared (tied) parameters are listed once
        if not param.requires_grad:
            continue
        (decay if decay_norms_and_embeddings or not _is_no_decay(name, param) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _fused_available(model: nn.Module) -> bool:
    """torch has fused AdamW kernels for CUDA and CPU; DTensor parameters on CPU are not covered."""
    params = list(model.parameters())
    if not params:
        return False
    device = params[0].device.type
    if any(p.device.type != device for p in params):
        return False
    if device == "cuda":
        return True
    is_dtensor = any(type(p).__name__ == "DTensor" for p in params)
    return device == "cpu" and not is_dtensor


def build_optimizer(model: nn.Module, opt: OptimizerSection, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over `model` with betas, eps and weight decay from the recipe; fused where possible."""
    if fused is None:
        fused = _fused_available(model)
    groups = param_groups(model, opt.weight_decay, opt.decay_norms_and_embeddings)
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, **kwargs)


def lr_multiplier(schedule: ScheduleSection, total_steps: int, base_lr: float | None = None) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step s (0-based).

    wsd: linear warmup over `warmup` steps (step 0 already gets 1/warmup), constant, then a
    linear decay over the last `decay` steps reaching the floor at the last step.
    cosine: warmup, then half a cosine from 1 to the floor at the last step.
    constant: warmup, then 1.
    The floor is schedule.min_lr / base_lr (0 when base_lr is not given).
    """
    warmup = min(schedule.warmup, total_steps)
    floor = min(1.0, schedule.min_lr / base_lr) if base_lr else 0.0
    decay = min(schedule.decay, max(total_steps - warmup, 0))

    def warm(step: int) -> float | None:
        return (step + 1) / warmup if step < warmup else None

    def wsd(step: int) -> float:
        w = warm(step)
        if w is not None:
            return w
        start = total_steps - decay
        if decay == 0 or step < start:
            return 1.0
        progress = min(1.0, (step - start + 1) / decay)
        return 1.0 - progress * (1.0 - floor)

    def cosine(step: int) -> float:
        w = warm(step)
        if w is not None:
            return w
        span = max(total_steps - warmup, 1)
        progress = min(1.0, (step - warmup + 1) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def constant(step: int) -> float:
        w = warm(step)
        return 1.0 if w is None else w

    return {"wsd": wsd, "cosine": cosine, "constant": constant}[schedule.kind]
