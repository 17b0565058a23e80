"""Which device a stage runs on: one rule for every verb ("auto", "cpu", "cuda", "cuda:N"), and its compute precision."""

from __future__ import annotations

import contextlib

import torch

from zagreus.errors import UserError


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    """"auto" takes the GPU of this rank (LOCAL_RANK under torchrun) when CUDA is visible, else the CPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if choice not in ("auto", "cuda") and not choice.startswith("cuda:"):
        raise UserError(f"device {choice!r}: choose auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"device {choice!r}: no CUDA device is visible here; use auto or cpu")
    device = torch.device(choice) if ":" in choice else torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU; fp32 on CPU (these CPUs have no native bf16, so it would only be slower)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
