"""CLI verbs of post-training: `zagreus sft RECIPE` and `zagreus dpo RECIPE`.

Only typer at module level, so `zagreus --help` does not wait for torch; the stages load inside the verbs.
"""

from __future__ import annotations

from pathlib import Path

import typer

FORCE_HELP = "start over, even if runs/<name>/{stage} is finished"


def _run_stage(stage: str, recipe: Path, force: bool) -> None:
    from zagreus.post.dpo import run_dpo
    from zagreus.post.sft import run_sft
    from zagreus.recipe import load_recipe

    out = {"sft": run_sft, "dpo": run_dpo}[stage](load_recipe(recipe), force=force)
    if out is None:
        typer.echo(f"{stage} stopped by SIGTERM after saving a checkpoint; run the same command to resume", err=True)
        raise typer.Exit(143)
    typer.echo(f"{stage}: wrote {out}")


def sft(recipe: Path = typer.Argument(..., help="YAML recipe with an sft: section"),
        force: bool = typer.Option(False, "--force", help=FORCE_HELP.format(stage="sft"))) -> None:
    """Supervised fine-tuning on chat data (assistant-only loss, packing); writes runs/<name>/sft/export."""
    _run_stage("sft", recipe, force)


def dpo(recipe: Path = typer.Argument(..., help="YAML recipe with a dpo: section"),
        force: bool = typer.Option(False, "--force", help=FORCE_HELP.format(stage="dpo"))) -> None:
    """Direct Preference Optimization (sigmoid loss) on prompt/chosen/rejected; writes runs/<name>/dpo/export."""
    _run_stage("dpo", recipe, force)


def register(app: typer.Typer) -> None:
    app.command("sft")(sft)
    app.command("dpo")(dpo)
