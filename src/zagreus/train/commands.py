"""CLI verb of the training stage: `zagreus pretrain RECIPE`.

Only typer at module level, so `zagreus --help` does not wait for torch; the stage loads inside the verb.
"""

from __future__ import annotations

from pathlib import Path

import typer


def _quick_eval(recipe):
    """lm-eval on eval.quick_task for the model in memory, or None when the recipe sets no quick task."""
    e = recipe.eval
    if not e.quick_task:
        return None
    from zagreus.eval.run import quick_mc_eval

    data_dir = recipe.resolve_path(e.data_dir) if e.data_dir else None
    return lambda model, tokenizer: quick_mc_eval(model, tokenizer, e.quick_task, e.quick_limit, data_dir=data_dir,
                                                  num_fewshot=e.num_fewshot.get(e.quick_task, 0),
                                                  batch_size=e.batch_size)


def pretrain(recipe: Path = typer.Argument(..., help="YAML recipe; its data stage must have run")) -> None:
    """Pretrain (or resume from the latest checkpoint) the recipe's model on its tokenized shards."""
    from zagreus.recipe import load_recipe
    from zagreus.train.loop import run_pretrain

    r = load_recipe(recipe, check_inputs=False)
    last = run_pretrain(r, quick_eval=_quick_eval(r))
    if last.get("stopped_by_signal"):
        typer.echo("pretraining stopped by SIGTERM after saving a checkpoint; run the same command to resume", err=True)
        raise typer.Exit(143)
    if last:
        typer.echo(f"pretraining done at step {last['step']}: loss {last['loss']:.4f}"
                   + (f", val loss {last['val_loss']:.4f}, val bits/byte {last['val_bpb']:.4f}" if "val_loss" in last else ""))


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain)
