"""CLI verbs of the data stage: `zagreus data tokenize` and `zagreus data stats`."""

from __future__ import annotations

# Only typer, zagreus.errors and the standard library at module level, so `zagreus --help` stays
# fast; each verb imports the code it runs.
import json
from pathlib import Path
from typing import Optional

import typer

from zagreus.errors import UserError


def tokenize(recipe: Optional[Path] = typer.Argument(None, help="YAML recipe with a data: section"),
             input: Optional[list[str]] = typer.Option(None, "--input", help="quick form: file, folder or glob (repeatable)"),
             out: Optional[Path] = typer.Option(None, "--out", help="quick form: output folder for shards and manifest"),
             tokenizer: str = typer.Option("llama3", help="quick form: 'llama3' or a tokenizer file/folder"),
             workers: int = typer.Option(2, min=1, help="quick form: worker processes"),
             dedup: str = typer.Option("none", help="quick form: none, exact or minhash"),
             text_field: str = typer.Option("text", help="quick form: field of jsonl/parquet records holding the text"),
             on_error: str = typer.Option("fail", "--on-error",
                                          help="quick form: a damaged input file stops the run (fail) or is left out (skip)"),
             dry_run: bool = typer.Option(False, "--dry-run", help="print the Slurm jobs instead of submitting them"),
             wait: bool = typer.Option(True, "--wait/--no-wait", help="Slurm: wait for the jobs to end (default), or "
                                                                      "print their ids and return"),
             progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar")) -> None:
    """Filter, deduplicate, mix and tokenize into datatrove shards (+ manifest.json)."""
    from zagreus.data import stage

    if recipe is not None:
        if input or out:
            raise UserError("pass either a RECIPE or --input/--out (the quick form), not both")
        from zagreus.recipe import load_recipe

        from zagreus.rundir import RunDir

        loaded = load_recipe(recipe)
        result = stage.tokenize_recipe(loaded, dry_run=dry_run, show_progress=progress, wait=wait)
        out_dir = RunDir(loaded.run_path()).data
    else:
        if not input or out is None:
            raise UserError("give a RECIPE, or the quick form --input PATH_OR_GLOB... --out DIR")
        if dedup not in ("none", "exact", "minhash"):
            raise UserError(f"--dedup {dedup}: choose none, exact or minhash")
        if on_error not in ("fail", "skip"):
            raise UserError(f"--on-error {on_error}: choose fail or skip")
        from zagreus.recipe import TokenizerSection

        section = TokenizerSection(kind="llama3") if tokenizer == "llama3" else TokenizerSection(path=tokenizer)
        data = stage.quick_data_section(input, workers, dedup=dedup, text_field=text_field, on_error=on_error)
        result = stage.tokenize_data(data, out, section, dry_run=dry_run, show_progress=progress, wait=wait)
        out_dir = out
    if isinstance(result, list):
        for script in result:
            typer.echo(script)
        return
    typer.echo(f"wrote {out_dir}: {result['totals']['train']['tokens']:,} train + {result['totals']['val']['tokens']:,} val tokens")


def stats(folder: Path = typer.Argument(..., help="data folder (holding manifest.json) or run directory")) -> None:
    """Print a data folder's manifest as a table: documents, characters, tokens per source and split."""
    from zagreus.data.pipeline import MANIFEST
    from zagreus.rundir import RunDir

    path = RunDir(folder).manifest if RunDir.looks_like_run(folder) else folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder}: no manifest.json; run `zagreus data tokenize` first (an unfinished run has none)")
    typer.echo(format_manifest(json.loads(path.read_text())))


def format_manifest(m: dict) -> str:
    """A fixed-width table of a manifest."""
    head = f"{'source':<14} {'split':<5} {'weight':>7} {'docs':>10} {'chars':>14} {'tokens':>14} {'shards':>6}"
    lines = [f"tokenizer {m['tokenizer']['name']} (hash {m['tokenizer']['hash']}, vocab {m['tokenizer']['vocab_size']:,}, "
             f"{m['token_dtype']}); bos={m['policy']['add_bos']} eos={m['policy']['add_eos']}", head, "-" * len(head)]
    for name, s in m["sources"].items():
        for split in ("train", "val"):
            t = s[split]
            lines.append(f"{name:<14} {split:<5} {s['weight']:>7.3f} {t['docs']:>10,} {t['chars']:>14,} "
                         f"{t['tokens']:>14,} {len(t['shards']):>6}")
    for split in ("train", "val"):
        t = m["totals"][split]
        lines.append(f"{'total':<14} {split:<5} {'':>7} {t['docs']:>10,} {t['chars']:>14,} {t['tokens']:>14,}")
    removed = []
    for name, s in m["sources"].items():
        parts = [f"{k} {v['docs']:,} docs/{v['chars']:,} chars" for k, v in s["filters"].items()]
        parts += [f"{k} {v:,}" for k, v in s["skipped"].items()]
        if parts:
            removed.append(f"  {name}: " + ", ".join(parts))
    if removed:
        lines += ["removed / skipped:"] + removed
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    group = typer.Typer(no_args_is_help=True, help="Data: sources, filters, dedup, mixture, tokenized shards.")
    group.command("tokenize")(tokenize)
    group.command("stats")(stats)
    app.add_typer(group, name="data")
