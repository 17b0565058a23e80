"""CLI verbs of post-training: `zagreus sft RECIPE` and `zagreus dpo RECIPE`.

Only typer at module level, so `zagreus --help` does not wait for torch; the stages load inside the verbs.
"""

from __future__ import annotations

from pathlib import Path

import typer

STOPPED = "{stage} stopped by SIGTERM after saving a checkpoint; run the same command to resume"


def sft(recipe: Path = typer.Argument(..., help="YAML recipe with an sft: section"),
        force: bool = typer.Option(False, "--force", help="start over, even if runs/<name>/sft is finished")) -> None:
    """Supervised fine-tuning on chat data (assistant-only loss, packing); writes runs/<name>/sft/export."""
    from zagreus.post.sft import run_sft
    from zagreus.recipe import load_recipe

    out = run_sft(load_recipe(recipe), force=force)
    if out is None:
        typer.echo(STOPPED.format(stage="sft"), err=True)
        raise typer.Exit(143)
    typer.echo(f"sft: wrote {out}")


def dpo(recipe: Path = typer.Argument(..., help="YAML recipe with a dpo: section"),
        force: bool = typer.Option(False, "--force", help="start over, even if runs/<name>/dpo is finished")) -> None:
    """Direct Preference Optimization (sigmoid loss) on prompt/chosen/rejected; writes runs/<name>/dpo/export."""
    from zagreus.post.dpo import run_dpo
    from zagreus.recipe import load_recipe

    out = run_dpo(load_recipe(recipe), force=force)
    if out is None:
        typer.echo(STOPPED.format(stage="dpo"), err=True)
        raise typer.Exit(143)
    typer.echo(f"dpo: wrote {out}")


def register(app: typer.Typer) -> None:
    app.command("sft")(sft)
    app.command("dpo")(dpo)
