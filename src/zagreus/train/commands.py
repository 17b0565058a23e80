"""CLI verb of the training stage: `zagreus pretrain RECIPE`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def pretrain(recipe: Path = typer.Argument(..., help="YAML recipe; its data stage must have run")) -> None:
        """Pretrain (or resume from the latest checkpoint) the recipe's model on its tokenized shards."""
        if "torch" not in sys.modules:
            # OpenMP threads that spin at barriers collapse on a shared CPU (measured on 2 busy cores:
            # 436 instead of ~5,900 tokens/s for the tiny model); sleeping threads do not. Read once,
            # when torch loads, so it must be set before the import.
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from zagreus.recipe import load_recipe
        from zagreus.train.loop import run_pretrain

        r = load_recipe(recipe, check_inputs=False)
        last = run_pretrain(r)
        if last:
            typer.echo(f"pretraining done at step {last['step']}: loss {last['loss']:.4f}"
                       + (f", val loss {last['val_loss']:.4f}, val bits/byte {last['val_bpb']:.4f}" if "val_loss" in last else ""))
