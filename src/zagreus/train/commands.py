"""CLI verb of the training stage: `zagreus pretrain RECIPE`."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def pretrain(recipe: Path = typer.Argument(..., help="YAML recipe; its data stage must have run")) -> None:
        """Pretrain (or resume from the latest checkpoint) the recipe's model on its tokenized shards."""
        from zagreus.recipe import load_recipe
        from zagreus.train.loop import run_pretrain

        r = load_recipe(recipe, check_inputs=False)
        last = run_pretrain(r)
        if last.get("stopped_by_signal"):
            typer.echo("pretraining stopped by SIGTERM after saving a checkpoint; run the same command to resume", err=True)
            raise typer.Exit(143)
        if last:
            typer.echo(f"pretraining done at step {last['step']}: loss {last['loss']:.4f}"
                       + (f", val loss {last['val_loss']:.4f}, val bits/byte {last['val_bpb']:.4f}" if "val_loss" in last else ""))
