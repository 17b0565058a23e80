"""`zagreus run RECIPE`: the stages of a recipe chained, each in its own process; and the plan
that `zagreus check RECIPE` prints.

Each stage is the same CLI verb a user would type, so a chained run and a hand-run one write
the same files; every stage resumes or skips work already done, so rerunning `zagreus run`
after a crash continues where it stopped.

The chain writes no exports/: eval scores the checkpoints themselves and release exports the
final model, so nothing would read them; `zagreus export` writes one on demand. A recipe that
post-trains (with or without pretraining, e.g. recipes/nesso-0.4b-*.yaml) also scores its final
model, the last post-training stage's export, on eval.tasks (final-eval, into
RUN_DIR/eval/<stage>.json, which the model card shows) before release ships it.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

from zagreus.data.pricing import price
from zagreus.errors import UserError
from zagreus.recipe import Recipe, dump_recipe
from zagreus.rundir import RunDir

log = logging.getLogger(__name__)

# eval scores the pretraining checkpoints; final-eval the post-trained model that release ships.
STAGES = ["data", "pretrain", "eval", "sft", "dpo", "final-eval", "release"]


def _eval_args(recipe: Recipe, model: str) -> list[str]:
    """`zagreus eval MODEL` with the recipe's tasks, limit and data folder (few-shot counts come from the run's recipe)."""
    args = ["eval", model, "--tasks", ",".join(recipe.eval.tasks)]
    if recipe.eval.limit is not None:
        args += ["--limit", str(recipe.eval.limit)]
    if recipe.eval.data_dir is not None:
        args += ["--data-dir", str(recipe.resolve_path(recipe.eval.data_dir))]
    return args


def final_stage(recipe: Recipe) -> str | None:
    """The post-training stage whose export is the run's final model (dpo, else sft), None when it has none."""
    return "dpo" if recipe.dpo is not None else "sft" if recipe.sft is not None else None


def stage_commands(recipe: Recipe, recipe_path: Path) -> list[tuple[str, list[str]]]:
    """(stage, CLI arguments) for every stage the recipe configures, in pipeline order."""
    run = RunDir(recipe.run_path())
    path = str(recipe_path)
    commands: list[tuple[str, list[str]]] = []
    # A recipe without data is post-training only (sft.init or dpo.init names the base model).
    if recipe.data is not None:
        commands.append(("data", ["data", "tokenize", path]))
        commands.append(("pretrain", ["pretrain", path]))
        if recipe.eval.tasks:
            commands.append(("eval", [*_eval_args(recipe, str(run.root)), "--every-checkpoint"]))
    if recipe.sft is not None:
        commands.append(("sft", ["sft", path]))
    if recipe.dpo is not None:
        commands.append(("dpo", ["dpo", path]))
    final = final_stage(recipe)
    if recipe.eval.tasks and final is not None:
        commands.append(("final-eval", [*_eval_args(recipe, str(run.stage(final).export)),
                                        "--out", str(run.stage_eval(final))]))
    commands.append(("release", ["release", str(run.root)]))
    return commands


def _up_to_date(recipe: Recipe, stage: str) -> bool:
    """final-eval's results are newer than the export they score (a rerun after a later failure skips it)."""
    final = final_stage(recipe)
    if stage != "final-eval" or final is None:
        return False
    run = RunDir(recipe.run_path())
    results, summary = run.stage_eval(final), run.stage(final).summary
    return results.is_file() and summary.is_file() and results.stat().st_mtime >= summary.stat().st_mtime


def plan(recipe: Recipe, recipe_path: Path, *, gpus: int | None, gpu: str, mfu: float) -> list[str]:
    """The lines `zagreus check` prints: run directory, stages, model size, token budget, mixture, and
    for pretraining the per-GPU memory and throughput of its layout on `gpus` x `gpu` at `mfu`
    (zagreus.train.memory; gpus None: the layout's own size, or one 8-GPU node for dp_shard -1)."""
    lines = [f"recipe {recipe_path}: OK",
             f"  run directory : {recipe.run_path()}",
             f"  stages        : {' -> '.join(stage for stage, _ in stage_commands(recipe, recipe_path))}"]
    if recipe.data is not None:
        cfg = recipe.model.resolve()
        counts = cfg.param_counts()
        p = recipe.pretrain
        tokens_per_step = p.tokens_per_step or p.seq_len * p.micro_batch
        lines.append(f"  model         : {recipe.model.preset or 'custom'}, {counts['total']:,} parameters "
                     f"({counts['non_embedding']:,} non-embedding)")
        lines.append(f"  pretraining   : {p.steps:,} steps x {tokens_per_step:,} tokens = {p.steps * tokens_per_step:.3g} tokens, "
                     f"{cfg.flops_per_token(p.seq_len) * p.steps * tokens_per_step:.3g} FLOPs")
        total_w = sum(s.weight for s in recipe.data.sources)
        for s in recipe.data.sources:
            origin = s.hub or (s.paths() and ", ".join(s.paths())) or "python stdlib"
            lines.append(f"  source {s.name:<12}: {s.weight / total_w:6.1%} of tokens from {origin}")
        cost = price(recipe.data, recipe.tokenizer)
        lines += cost.lines() if cost is not None else ["  data cost     : no data.tokens budget, so no estimate "
                                                        "(every document of the sources is read)"]
        from zagreus.train.memory import estimate, report  # torch: only recipes that pretrain pay for it

        lines += report(estimate(cfg, p, gpus, gpu, mfu))
    log.debug("resolved recipe:\n%s", dump_recipe(recipe))
    return lines


def run_pipeline(recipe: Recipe, recipe_path: Path, first: str | None = None, last: str | None = None) -> None:
    for name, label in ((first, "--from"), (last, "--until")):
        if name is not None and name not in STAGES:
            raise UserError(f"{label} {name}: unknown stage; choose one of {', '.join(STAGES)}")
    lo = STAGES.index(first) if first else 0
    hi = STAGES.index(last) if last else len(STAGES) - 1
    selected = [(s, a) for s, a in stage_commands(recipe, recipe_path) if lo <= STAGES.index(s) <= hi]
    if not selected:
        raise UserError(f"no stage of {recipe_path} lies between {first or STAGES[0]} and {last or STAGES[-1]}; "
                        f"its stages are {', '.join(s for s, _ in stage_commands(recipe, recipe_path))}")
    for i, (stage, args) in enumerate(selected, 1):
        if _up_to_date(recipe, stage):
            log.info("[%d/%d] stage %s: %s is newer than the model it scores; skipped", i, len(selected), stage,
                     RunDir(recipe.run_path()).stage_eval(final_stage(recipe)))
            continue
        log.info("[%d/%d] stage %s: zagreus %s", i, len(selected), stage, " ".join(args))
        start = time.time()
        result = subprocess.run([sys.executable, "-m", "zagreus.cli", *args])
        if result.returncode != 0:
            raise UserError(
                f"stage '{stage}' failed (exit {result.returncode}); fix the problem above and rerun "
                f"`zagreus run {recipe_path} --from {stage}` (finished stages are not redone)"
            )
        log.info("stage %s done in %.1f s", stage, time.time() - start)
