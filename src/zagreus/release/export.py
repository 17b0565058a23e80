"""`zagreus export`: any saved model (checkpoint, run directory, export folder) as a Hugging Face
folder that transformers and `lm-eval --model hf` load as-is."""

from __future__ import annotations

from pathlib import Path

import torch

from zagreus.checkpoint import load_model_and_tokenizer
from zagreus.errors import UserError
from zagreus.model.hf import save_hf
from zagreus.post.chat import saved_chat_template
from zagreus.rundir import is_export, locate, read_meta, resolve_checkpoint


def default_export_dir(source: Path) -> Path:
    """RUN_DIR/exports/step-N for a pretraining checkpoint, or for the latest one of a run directory."""
    if is_export(source):
        raise UserError(f"{source} is already an export folder; pass --out to copy it elsewhere")
    checkpoint = resolve_checkpoint(source)
    located = locate(checkpoint)
    if located.run is None or located.stage != "pretrain":
        raise UserError(f"{checkpoint}: not a pretraining checkpoint of a run directory, so it has no default "
                        f"RUN_DIR/exports/step-N; pass --out")
    return located.run.export_dir(read_meta(checkpoint)["step"])


def export(source: Path, out: Path | None = None, dtype: str = "float32") -> Path:
    """Write `source` as a Hugging Face folder `out` (default: default_export_dir) in `dtype`; returns `out`."""
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype {dtype}: choose float32 or bfloat16")
    source = Path(source)
    if out is None:
        out = default_export_dir(source)
    model, tok = load_model_and_tokenizer(source)
    return save_hf(model, tok, out, dtype=getattr(torch, dtype), chat_template=saved_chat_template(source))
