"""The `zagreus` command line: one typer app, each verb a thin call into the module owning it.

Heavy libraries (torch, transformers) are imported inside the commands so `--help` is instant.
Mistakes the user can fix (UserError) print one line and exit with status 2, no traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from zagreus.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train small bilingual language models end to end.")
model_app = typer.Typer(no_args_is_help=True, help="Model presets: sizes, FLOPs, random initialisation.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Tokenizers: Llama-3 export, BPE training.")
app.add_typer(model_app, name="model")
app.add_typer(tokenizer_app, name="tokenizer")

log = logging.getLogger("zagreus")


def _model_config_from(target: str):
    from zagreus.model.config import PRESETS, resolve_model_config
    from zagreus.recipe import load_recipe

    if target in PRESETS:
        return resolve_model_config(target)
    if target.endswith((".yaml", ".yml")):
        recipe = load_recipe(target, check_inputs=False)
        return recipe.model.resolve()
    raise UserError(f"'{target}' is neither a preset ({', '.join(PRESETS)}) nor a recipe file (.yaml)")


@app.command()
def check(recipe: Path = typer.Argument(..., help="YAML recipe")) -> None:
    """Validate a recipe and print the plan: stages, model size, token budget."""
    from zagreus.pipeline import stage_commands
    from zagreus.recipe import dump_recipe, load_recipe

    r = load_recipe(recipe)
    typer.echo(f"recipe {recipe}: OK")
    typer.echo(f"  run directory : {r.run_path()}")
    typer.echo(f"  stages        : {' -> '.join(stage for stage, _ in stage_commands(r, recipe))}")
    if r.data is not None:
        cfg = r.model.resolve()
        counts = cfg.param_counts()
        p = r.pretrain
        tokens_per_step = p.tokens_per_step or p.seq_len * p.micro_batch
        typer.echo(f"  model         : {r.model.preset or 'custom'}, {counts['total']:,} parameters "
                   f"({counts['non_embedding']:,} non-embedding)")
        typer.echo(f"  pretraining   : {p.steps:,} steps x {tokens_per_step:,} tokens = {p.steps * tokens_per_step:.3g} tokens, "
                   f"{cfg.flops_per_token(p.seq_len) * p.steps * tokens_per_step:.3g} FLOPs")
        total_w = sum(s.weight for s in r.data.sources)
        for s in r.data.sources:
            origin = s.hub or (s.paths() and ", ".join(s.paths())) or "python stdlib"
            typer.echo(f"  source {s.name:<12}: {s.weight / total_w:6.1%} of tokens from {origin}")
    log.debug("resolved recipe:\n%s", dump_recipe(r))


@app.command()
def run(recipe: Path = typer.Argument(..., help="YAML recipe"),
        from_stage: Optional[str] = typer.Option(None, "--from", help="first stage to run"),
        until: Optional[str] = typer.Option(None, help="last stage to run")) -> None:
    """Run every stage of a recipe: data, pretrain, export, eval, sft, dpo, release."""
    from zagreus.pipeline import run_pipeline
    from zagreus.recipe import load_recipe

    run_pipeline(load_recipe(recipe), recipe, from_stage, until)


@model_app.command("info")
def model_info(target: str = typer.Argument(..., help="preset name or recipe file"),
               seq_len: Optional[int] = typer.Option(None, help="sequence length for the attention FLOPs")) -> None:
    """Print parameters (total, embedding, non-embedding) and training FLOPs per token as JSON."""
    cfg = _model_config_from(target)
    out = {"parameters": cfg.param_counts(), "flops_per_token": cfg.flops_per_token(seq_len),
           "seq_len": seq_len or cfg.max_seq_len, "config": cfg.model_dump()}
    typer.echo(json.dumps(out, indent=2))


@model_app.command("init")
def model_init(target: str = typer.Argument(..., help="preset name or recipe file"),
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


@tokenizer_app.command("train")
def tokenizer_train(input: list[Path] = typer.Option(..., "--input", help="jsonl (text field) or text files"),
                    vocab_size: int = typer.Option(8192, help="vocabulary size, special tokens included"),
                    out: Path = typer.Option(..., help="output folder"),
                    text_field: str = typer.Option("text", help="field of jsonl records holding the text"),
                    max_chars: int = typer.Option(50_000_000, help="stop reading input after this many characters")) -> None:
    """Train a byte-level BPE with the Llama-3 split pattern (HF tokenizers)."""
    from zagreus.tokenizer import train_bpe

    def texts():
        seen = 0
        for path in input:
            if not path.is_file():
                raise UserError(f"{path}: no such file; pass jsonl or text files to --input")
            with open(path, encoding="utf-8", errors="replace") as f:
                if path.suffix == ".jsonl":
                    for line in f:
                        try:
                            text = json.loads(line).get(text_field, "")
                        except (json.JSONDecodeError, AttributeError):
                            continue
                        seen += len(text)
                        yield text
                        if seen >= max_chars:
                            return
                else:
                    text = f.read(max_chars - seen)
                    seen += len(text)
                    yield text
            if seen >= max_chars:
                return

    tok = train_bpe(texts(), vocab_size, out)
    typer.echo(f"wrote {out}/tokenizer.json ({tok.vocab_size} tokens, fingerprint {tok.fingerprint})")


@tokenizer_app.command("export")
def tokenizer_export(spec: str = typer.Argument("llama3", help="'llama3', a tokenizer file or folder"),
                     out: Path = typer.Option(..., help="output folder")) -> None:
    """Write tokenizer.json + tokenizer_config.json for Hugging Face (ids equal tiktoken's)."""
    from zagreus.tokenizer import load_tokenizer

    tok = load_tokenizer(spec)
    tok.save(out)
    typer.echo(f"wrote {out}/tokenizer.json ({tok.vocab_size} tokens)")


@app.command("export")
def export(checkpoint: Path = typer.Argument(..., help="checkpoint folder, run directory or export folder"),
           out: Optional[Path] = typer.Option(None, help="output folder; default RUN_DIR/exports/step-N"),
           dtype: str = typer.Option("float32", help="float32 or bfloat16 weights")) -> None:
    """Write a Hugging Face folder that transformers and `lm-eval --model hf` load as-is."""
    import torch

    from zagreus.model.hf import save_hf
    from zagreus.checkpoint import load_model_and_tokenizer

    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype {dtype}: choose float32 or bfloat16")
    if out is None:
        out = _default_export_dir(checkpoint)
    model, tok = load_model_and_tokenizer(checkpoint)
    save_hf(model, tok, out, dtype=getattr(torch, dtype), chat_template=_chat_template_of(checkpoint))
    typer.echo(f"wrote {out}")


@app.command("release")
def release_cmd(source: Path = typer.Argument(..., help="run directory, checkpoint or export folder"),
                out: Optional[Path] = typer.Option(None, help="output folder; default RUN_DIR/release"),
                push: Optional[str] = typer.Option(None, help="Hugging Face repo id to upload to, e.g. org/zagreus-0.4b-ita"),
                private: bool = typer.Option(False, help="create the hub repo as private")) -> None:
    """Write a release folder (HF export + model card from the run's records); optionally upload it."""
    from zagreus.release import release

    folder = release(source, out, push, private)
    typer.echo(f"wrote {folder}" + (f" and uploaded it to {push}" if push else ""))


def _default_export_dir(source: Path) -> Path:
    from zagreus.rundir import resolve_checkpoint

    if (source / "config.json").is_file():
        raise UserError(f"{source} is already an export folder; pass --out to copy it elsewhere")
    checkpoint = resolve_checkpoint(source)
    # runs/<name>/checkpoints/step-N -> runs/<name>/exports/step-N
    return checkpoint.parent.parent / "exports" / checkpoint.name


def _chat_template_of(folder: Path) -> str | None:
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text()).get("chat_template")
    return None


def _register_stage_commands() -> None:
    """Each stage owns its verbs in a `commands` module that imports only typer at top level."""
    import importlib

    for module in ("zagreus.data.commands", "zagreus.train.commands", "zagreus.eval.commands",
                   "zagreus.post.commands", "zagreus.serve.commands", "zagreus.launch.commands"):
        importlib.import_module(module).register(app)


_register_stage_commands()


def main() -> None:
    # OpenMP threads that spin at barriers collapse on a shared CPU (measured on 2 busy cores: 436
    # instead of ~5,900 tokens/s for the tiny model); sleeping ones do not. torch reads it once, on import.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        # Without standalone mode click returns the code of a typer.Exit instead of raising it.
        code = app(standalone_mode=False)
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        # Usage errors of click (or of the click that typer vendors) print themselves: no traceback.
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    if isinstance(code, int):
        sys.exit(code)


if __name__ == "__main__":
    main()
