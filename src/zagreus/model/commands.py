"""`zagreus model info` and `zagreus model init`: a preset's (or recipe's) size, FLOPs and random init."""

from __future__ import annotations

# Only typer, zagreus.errors and the standard library at module level, so `zagreus --help` stays
# fast; each verb imports the code it runs.
import json
import logging
from pathlib import Path
from typing import Optional

import typer

from zagreus.errors import UserError

log = logging.getLogger(__name__)


def _model_config_from(target: str):
    """The model config of a preset name or of a recipe file's model: section."""
    from zagreus.model.config import PRESETS, resolve_model_config
    from zagreus.recipe import load_recipe

    if target in PRESETS:
        return resolve_model_config(target)
    if target.endswith((".yaml", ".yml")):
        return load_recipe(target, check_inputs=False).model.resolve()
    raise UserError(f"'{target}' is neither a preset ({', '.join(PRESETS)}) nor a recipe file (.yaml)")


def info(target: str = typer.Argument(..., help="preset name or recipe file"),
         seq_len: Optional[int] = typer.Option(None, help="sequence length for the attention FLOPs")) -> None:
    """Print parameters (total, embedding, non-embedding) and training FLOPs per token as JSON."""
    cfg = _model_config_from(target)
    out = {"parameters": cfg.param_counts(), "flops_per_token": cfg.flops_per_token(seq_len),
           "seq_len": seq_len or cfg.max_seq_len, "config": cfg.model_dump()}
    typer.echo(json.dumps(out, indent=2))


def init(target: str = typer.Argument(..., help="preset name or recipe file"),
         out: Path = typer.Option(..., help="output folder (Hugging Face format)"),
         seed: int = typer.Option(0, help="initialisation seed"),
         tokenizer: str = typer.Option("llama3", help="'llama3', a tokenizer file or folder")) -> None:
    """Write a randomly initialised model in the export format."""
    from zagreus.model.hf import save_hf
    from zagreus.model.llama import Transformer
    from zagreus.tokenizer import load_tokenizer

    cfg = _model_config_from(target)
    tok = load_tokenizer(tokenizer)
    if tok.vocab_size != cfg.vocab_size:
        cfg = cfg.model_copy(update={"vocab_size": tok.vocab_size, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id})
        log.info("vocabulary set to the tokenizer's %d tokens", tok.vocab_size)
    model = Transformer(cfg)
    model.init_weights(seed)
    save_hf(model, tok, out)
    typer.echo(f"wrote {out} ({cfg.param_counts()['total']:,} parameters, seed {seed})")


def register(app: typer.Typer) -> None:
    group = typer.Typer(no_args_is_help=True, help="Model presets: sizes, FLOPs, random initialisation.")
    group.command("info")(info)
    group.command("init")(init)
    app.add_typer(group, name="model")
