"""CLI verbs of the training stage: `zagreus pretrain RECIPE`, `zagreus checkpoint verify RUN_DIR`.

Only typer at module level, so `zagreus --help` does not wait for torch; the stage loads inside the verb.
"""

from __future__ import annotations

from pathlib import Path

import typer

from zagreus.errors import UserError


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


def verify(run_dir: Path = typer.Argument(..., help="run directory (every stage's checkpoints) or one checkpoint folder")) -> None:
    """Check every file of each checkpoint against the size and hash its meta.json records; exit 1 if any differs."""
    from zagreus.checkpoint import verify_checkpoint
    from zagreus.rundir import POST_STAGES, list_checkpoints, locate

    found = locate(run_dir)
    if found.kind == "export":
        raise UserError(f"{run_dir}: an export folder carries no checksums; pass a run directory or a checkpoint folder")
    if found.kind == "checkpoint":
        folders = [found.path]
    else:
        roots = [found.run.checkpoints, *(found.run.stage(name).checkpoints for name in POST_STAGES)]
        folders = [folder for root in roots for _, folder in list_checkpoints(root)]
    if not folders:
        raise UserError(f"{run_dir}: no checkpoints to verify (looked in checkpoints/ and "
                        f"{', '.join(f'{name}/checkpoints/' for name in POST_STAGES)})")
    damaged = 0
    for folder in folders:
        verdict = verify_checkpoint(folder)
        name = folder.relative_to(found.path) if found.kind == "run" else folder
        if verdict.damage:
            damaged += 1
            typer.echo(f"{name}: DAMAGED: {verdict.damage}")
        else:
            typer.echo(f"{name}: OK" + ("" if verdict.checked else " (unverified: saved before checkpoints carried checksums)"))
    if damaged:
        typer.echo(f"{damaged} of {len(folders)} checkpoints damaged; `zagreus pretrain` (or sft, dpo) sets a damaged "
                   f"latest checkpoint aside and resumes from the newest intact one", err=True)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain)
    group = typer.Typer(no_args_is_help=True, help="Checkpoints: verify their files against meta.json.")
    group.command("verify")(verify)
    app.add_typer(group, name="checkpoint")
