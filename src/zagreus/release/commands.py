"""`zagreus export` and `zagreus release`."""

from __future__ import annotations

# Only typer, zagreus.errors and the standard library at module level, so `zagreus --help` stays fast; each verb
# imports the code it runs.
from pathlib import Path
from typing import Optional

import typer

from zagreus.errors import UserError


def export(checkpoint: Path = typer.Argument(..., help="checkpoint folder, run directory or export folder"),
           out: Optional[Path] = typer.Option(None, help="output folder (a .gguf file with --format gguf); "
                                                          "default RUN_DIR/exports/step-N (for an export "
                                                          "folder, a GGUF goes inside it)"),
           dtype: str = typer.Option("float32", help="float32 or bfloat16 weights (--format hf)"),
           format: str = typer.Option("hf", "--format", help="hf (a Hugging Face folder) or gguf (one file for "
                                                             "llama.cpp, Ollama, LM Studio)"),
           quant: str = typer.Option("f16", help="GGUF weights: f16, q8_0 or q4_0 (--format gguf)")) -> None:
    """Write a Hugging Face folder that transformers and `lm-eval --model hf` load as-is, or a GGUF file."""
    if format == "gguf":
        from zagreus.release.gguf import export_gguf

        typer.echo(f"wrote {export_gguf(checkpoint, out, quant)}")
        return
    if format != "hf":
        raise UserError(f"--format {format}: choose hf or gguf")
    from zagreus.release.export import export as export_model

    typer.echo(f"wrote {export_model(checkpoint, out, dtype)}")


def release(source: Path = typer.Argument(..., help="run directory, checkpoint or export folder"),
            out: Optional[Path] = typer.Option(None, help="output folder; default RUN_DIR/release"),
            push: Optional[str] = typer.Option(None, help="Hugging Face repo id to upload to, e.g. org/zagreus-0.4b-ita"),
            private: bool = typer.Option(False, help="create the hub repo as private"),
            gguf: Optional[str] = typer.Option(None, help="GGUF files to add, comma-separated quants: f16,q8_0,q4_0")) -> None:
    """Write a release folder (HF export + model card from the run's records); optionally upload it."""
    from zagreus.release.publish import release as release_model

    quants = [q.strip() for q in gguf.split(",") if q.strip()] if gguf else []
    folder = release_model(source, out, push, private, quants)
    typer.echo(f"wrote {folder}" + (f" and uploaded it to {push}" if push else ""))


def register(app: typer.Typer) -> None:
    app.command("export")(export)
    app.command("release")(release)
