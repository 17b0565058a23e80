"""Open a model from whatever the user points at: an export folder or a training checkpoint."""

from __future__ import annotations

from pathlib import Path

from zagreus.errors import UserError


def load_model_and_tokenizer(path: str | Path, device: str = "cpu"):
    """(Transformer, Tokenizer) from a Hugging Face export folder or a zagreus checkpoint."""
    from zagreus.model.hf import load_hf
    from zagreus.tokenizer import load_tokenizer

    path = Path(path)
    if (path / "config.json").is_file():
        return load_hf(path, device=device), load_tokenizer(str(path))
    if (path / "meta.json").is_file() or (path / "checkpoints").is_dir():
        from zagreus.train.checkpoint import load_checkpoint_model

        return load_checkpoint_model(path, device=device)
    raise UserError(f"{path}: neither an export folder (config.json) nor a checkpoint (meta.json) nor a run directory")
