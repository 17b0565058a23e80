"""`zagreus export` and `zagreus release`."""

from __future__ import annotations

# Only typer and the standard library at module level, so `zagreus --help` stays fast; each verb
# imports the code it runs.
from pathlib import Path
from typing import Optional

import typer


def export(checkpoint: Path = typer.Argument(..., help="checkpoint folder, run directory or export folder"),
           out: Optional[Path] = typer.Option(None, help="output folder; default RUN_DIR/exports/step-N"),
           dtype: str = typer.Option("float32", help="float32 or bfloat16 weights")) -> None:
    """Write a Hugging Face folder that transformers and `lm-eval --model hf` load as-is."""
    from zagreus.release.export import export as export_model

    typer.echo(f"wrote {export_model(checkpoint, out, dtype)}")


def release(source: Path = typer.Argument(..., help="run directory, checkpoint or export folder"),
            out: Optional[Path] = typer.Option(None, help="output folder; default RUN_DIR/release"),
            push: Optional[str] = typer.Option(None, help="Hugging Face repo id to upload to, e.g. org/zagreus-0.4b-ita"),
            private: bool = typer.Option(False, help="create the hub repo as private")) -> None:
    """Write a release folder (HF export + model card from the run's records); optionally upload it."""
    from zagreus.release.publish import release as release_model

    folder = release_model(source, out, push, private)
    typer.echo(f"wrote {folder}" + (f" and uploaded it to {push}" if push else ""))


def register(app: typer.Typer) -> None:
    app.command("export")(export)
    app.command("release")(release)
