"""`zagreus tokenizer train` and `zagreus tokenizer export`."""

from __future__ import annotations

# Only typer and the standard library at module level, so `zagreus --help` stays fast; each verb
# imports the code it runs.
from pathlib import Path

import typer


def train(input: list[Path] = typer.Option(..., "--input", help="jsonl (text field) or text files"),
          vocab_size: int = typer.Option(8192, help="vocabulary size, special tokens included"),
          out: Path = typer.Option(..., help="output folder"),
          text_field: str = typer.Option("text", help="field of jsonl records holding the text"),
          max_chars: int = typer.Option(50_000_000, help="stop reading input after this many characters")) -> None:
    """Train a byte-level BPE with the Llama-3 split pattern (HF tokenizers)."""
    from zagreus.tokenizer import read_texts, train_bpe

    tok = train_bpe(read_texts(input, text_field, max_chars), vocab_size, out)
    typer.echo(f"wrote {out}/tokenizer.json ({tok.vocab_size} tokens, fingerprint {tok.fingerprint})")


def export(spec: str = typer.Argument("llama3", help="'llama3', a tokenizer file or folder"),
           out: Path = typer.Option(..., help="output folder")) -> None:
    """Write tokenizer.json + tokenizer_config.json for Hugging Face (ids equal tiktoken's)."""
    from zagreus.tokenizer import load_tokenizer

    tok = load_tokenizer(spec)
    tok.save(out)
    typer.echo(f"wrote {out}/tokenizer.json ({tok.vocab_size} tokens)")


def register(app: typer.Typer) -> None:
    group = typer.Typer(no_args_is_help=True, help="Tokenizers: Llama-3 export, BPE training.")
    group.command("train")(train)
    group.command("export")(export)
    app.add_typer(group, name="tokenizer")
