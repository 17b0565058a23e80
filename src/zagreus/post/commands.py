"""`zagreus sft RECIPE` and `zagreus dpo RECIPE`; only typer at import time (torch loads inside)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("sft")
    def sft(recipe: Path = typer.Argument(..., help="YAML recipe with an sft: section"),
            force: bool = typer.Option(False, "--force", help="train again even if runs/<name>/sft is finished")) -> None:
        """Supervised fine-tuning on chat data (assistant-only loss, packing); writes runs/<name>/sft/export."""
        from zagreus.post.sft import run_sft
        from zagreus.recipe import load_recipe

        out = run_sft(load_recipe(recipe), force=force)
        typer.echo(f"sft: wrote {out}")

    @app.command("dpo")
    def dpo(recipe: Path = typer.Argument(..., help="YAML recipe with a dpo: section"),
            force: bool = typer.Option(False, "--force", help="train again even if runs/<name>/dpo is finished")) -> None:
        """Direct Preference Optimization (sigmoid loss) on prompt/chosen/rejected; writes runs/<name>/dpo/export."""
        from zagreus.post.dpo import run_dpo
        from zagreus.recipe import load_recipe

        out = run_dpo(load_recipe(recipe), force=force)
        typer.echo(f"dpo: wrote {out}")
