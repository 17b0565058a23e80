"""`zagreus data tokenize`: from a recipe (or the quick form) to shards, manifest and tokenizer folder.

Owns the order of the stage — tokenizer (loaded, or trained on the sources' text), plan, work
units on the chosen executor, finalize — and the rules for an output folder that already holds
data: the same plan resumes or returns the finished manifest, another plan is refused.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Callable

from zagreus.data import dedup, pipeline, plan as plans, shards
from zagreus.data.pipeline import PhaseClock
from zagreus.data.filters import LanguageFilter
from zagreus.errors import UserError
from zagreus.recipe import DataSection, Recipe, TokenizerSection
from zagreus.rundir import RunDir
from zagreus.tokenizer import load_tokenizer, train_bpe

log = logging.getLogger(__name__)

TRAINED_MARKER = ".zagreus-trained"


def _tokenizer(section: TokenizerSection, tokenizer_dir: Path | None, data: DataSection, units, resolve):
    """(spec for workers, Tokenizer); trains the BPE once, saves the run's tokenizer folder."""
    if section.train is not None:
        if tokenizer_dir is None:
            raise UserError("tokenizer: {train: ...} needs a run directory; use a recipe, not the quick form")
        if not (tokenizer_dir / TRAINED_MARKER).is_file():
            # A folder without the marker is a training that was killed: start it again.
            shutil.rmtree(tokenizer_dir, ignore_errors=True)
            log.info("training a %d-token BPE on up to %d characters of the sources", section.train.vocab_size,
                     section.train.max_chars)
            train_bpe(pipeline.iter_unit_texts(data, units, section.train.max_chars), section.train.vocab_size,
                      tokenizer_dir)
            (tokenizer_dir / TRAINED_MARKER).write_text("")
        spec = str(tokenizer_dir.resolve())  # workers (and Slurm jobs) may run from another directory
        return spec, load_tokenizer(spec)
    spec = "llama3" if section.kind == "llama3" else str(resolve(section.path))
    tok = load_tokenizer(spec)
    if tokenizer_dir is not None and not (tokenizer_dir / "tokenizer_config.json").is_file():
        tmp = tokenizer_dir.with_name(tokenizer_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save(tmp)
        tmp.rename(tokenizer_dir)
    return spec, tok


def tokenize_data(data: DataSection, data_dir: Path, tokenizer: TokenizerSection, *,
                  tokenizer_dir: Path | None = None, resolve: Callable[[str], Path] = Path,
                  dry_run: bool = False, show_progress: bool = True, wait: bool = True) -> dict | list[str]:
    """Run the stage; returns the manifest, or on Slurm with `dry_run` the sbatch scripts, without `wait`
    the lines naming the jobs submitted."""
    data_dir = Path(data_dir)
    clock = PhaseClock()
    if data.filters.languages:
        try:
            LanguageFilter(data.filters.languages, data.filters.language_threshold)
        except ValueError as exc:
            raise UserError(f"data.filters.languages: {exc}; use ISO 639-1 codes such as en, it") from None
    data, units, origins = plans.plan_units(data, resolve)
    spec, tok = _tokenizer(tokenizer, tokenizer_dir, data, units, resolve)
    plan = plans.make_plan(data, data_dir, spec, tok.identity(), units, origins)
    manifest_path = data_dir / pipeline.MANIFEST
    if manifest_path.is_file():
        done = json.loads(manifest_path.read_text())
        if done.get("plan") == plan.hash:
            shutil.rmtree(data_dir / ".work", ignore_errors=True)
            log.info("%s is complete (plan %s); nothing to do", data_dir, plan.hash)
            return done
        raise UserError(f"{data_dir} already holds shards of another plan (inputs, filters or tokenizer changed); "
                        "remove the folder or write to another one")
    if not plan.work_dir.is_dir():
        # A new plan: shards and work a killed run of another plan left behind are not ours to keep.
        for stale in ("train", "val", ".work"):
            shutil.rmtree(data_dir / stale, ignore_errors=True)
    plan.save()
    phases = {"plan": clock.lap(tasks=1)}
    cfg = data.executor
    # One logging folder per plan: datatrove's completion markers of another plan must not skip tasks.
    logging_dir = (Path(resolve(cfg.logging_dir)) if cfg.logging_dir else data_dir / "logs") / plan.hash
    log.info("plan %s: %d work units from %d source(s), tokenizer %s%s", plan.hash, len(units), len(data.sources),
             tok.name, f", dedup {data.filters.dedup}" if plan.dedup else "")
    if cfg.kind == "slurm":
        # imports datatrove: only for the executors that need it
        from zagreus.data.executors import launch_slurm, submit_slurm, wait_slurm

        try:
            if dry_run:
                return launch_slurm(plan, cfg, logging_dir, dry_run)
            jobs = submit_slurm(plan, cfg, logging_dir)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        submitted = [f"submitted job {job_id} ({name})" for name, job_id in jobs.items()]
        if not wait:
            return submitted
        for line in submitted:
            log.info("%s; waiting for it", line)
        wait_slurm(list(jobs.values()))
        if not manifest_path.is_file():
            raise UserError(f"Slurm job(s) {', '.join(jobs.values())} ended without writing {manifest_path}; "
                            f"their logs are in {logging_dir}")
        return json.loads(manifest_path.read_text())
    if dry_run:
        raise UserError("--dry-run shows the Slurm job; set data.executor.kind: slurm in the recipe")
    if cfg.kind in ("datatrove", "ray"):
        from zagreus.data.executors import run_stage  # imports datatrove (and ray), as above

        def run(stage: str) -> None:
            run_stage(plan, cfg, logging_dir, stage)
    else:
        def run(stage: str) -> None:
            pipeline.run_local(plan, cfg.workers, stage, show_progress)
    if plan.dedup:
        run("signatures")
        phases["signatures"] = clock.lap(tasks=cfg.task_count)
        run("buckets")
        phases["buckets"] = clock.lap(tasks=cfg.task_count)
        dedup.cluster(plan, cfg.task_count)
        phases["clusters"] = clock.lap(tasks=1)
    run("units")
    phases["units"] = clock.lap(tasks=cfg.task_count)
    manifest = pipeline.finalize(plan, phases, clock)
    log.info("wrote %s: %s train tokens, %s val tokens", data_dir, f"{manifest['totals']['train']['tokens']:,}",
             f"{manifest['totals']['val']['tokens']:,}")
    wall = sum(p["wall_s"] for p in manifest["phases"].values())
    serial = sum(p["wall_s"] for p in manifest["phases"].values() if p["tasks"] == 1)
    log.info("time: %s; %.1f%% of the wall time in single-task phases",
             ", ".join(f"{k} {v['wall_s']:.1f} s" for k, v in manifest["phases"].items()), 100 * serial / max(wall, 1e-9))
    return manifest


def tokenize_recipe(recipe: Recipe, dry_run: bool = False, show_progress: bool = True,
                    wait: bool = True) -> dict | list[str]:
    if recipe.data is None:
        raise UserError(f"{recipe.source_path}: the recipe has no 'data:' section to tokenize")
    run = RunDir(recipe.run_path())
    return tokenize_data(recipe.data, run.data, recipe.tokenizer, tokenizer_dir=run.tokenizer,
                         resolve=lambda p: recipe.resolve_path(p), dry_run=dry_run, show_progress=show_progress,
                         wait=wait)


def quick_data_section(inputs: list[str], workers: int, dedup: str = "none", validation_fraction: float = 0.0,
                       text_field: str = "text", shard_tokens: int = 100_000_000, on_error: str = "fail") -> DataSection:
    """The quick form: every input in one source 'input', tokenization only unless asked for more."""
    return DataSection(
        sources=[{"name": "input", "path": list(inputs), "text_field": text_field}],
        filters={"min_chars": 1, "quality": False, "dedup": dedup},
        validation_fraction=validation_fraction, shard_tokens=shard_tokens, on_error=on_error,
        executor={"kind": "local", "workers": workers},
    )


def check_shards(data_dir: Path, tokenizer_spec: str) -> dict:
    """The manifest of a shard folder, after refusing it if another tokenizer made it."""
    data_dir = Path(data_dir)
    shards.check_identity(data_dir, load_tokenizer(tokenizer_spec).identity())
    return json.loads((data_dir / pipeline.MANIFEST).read_text())
