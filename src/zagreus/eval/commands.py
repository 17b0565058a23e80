"""`zagreus eval` and `zagreus compare`."""

from __future__ import annotations

# Only typer, zagreus.errors and the standard library at module level, so `zagreus --help` stays
# fast; each verb imports the code it runs.
import json
import os
from pathlib import Path
from typing import Optional

import typer

from zagreus.errors import UserError


def _split(tasks: str | None) -> list[str]:
    return [t.strip() for t in (tasks or "").split(",") if t.strip()]


def _recipe_defaults(model: Path) -> dict:
    """The run's recipe `eval:` section, when MODEL is (inside) a run directory that has one."""
    from zagreus.recipe import load_recipe
    from zagreus.rundir import enclosing_run

    run = enclosing_run(model) if model.exists() else None  # a hub id names no run
    if run is None or not run.recipe.is_file():
        return {}
    recipe = load_recipe(run.recipe, check_inputs=False)
    section = recipe.eval
    data_dir = str(recipe.resolve_path(section.data_dir)) if section.data_dir else None
    return {"tasks": section.tasks, "num_fewshot": section.num_fewshot or None, "limit": section.limit,
            "batch_size": section.batch_size, "data_dir": data_dir}


def evaluate(
    model: Path = typer.Argument(..., help="export folder, checkpoint folder, run directory, or any Hugging Face "
                                 "causal LM (a local folder or a hub id such as Qwen/Qwen3-0.6B)"),
    tasks: Optional[str] = typer.Option(None, help="comma-separated lm-eval tasks or the report's suites (report-ita, "
                                        "nesso, pt-leaderboard, ...), e.g. zagreus_arc_it,arc_it "
                                        "(default: the run's recipe eval.tasks)"),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", min=0, help="few-shot examples for every task"),
    limit: Optional[float] = typer.Option(None, min=0.0001, help="items per task (a fraction if below 1)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="batch size: x256 tokens per forward "
                                             "for our models, sequences for other architectures (lm-eval's HFLM)"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="folder with the files of the zagreus_* tasks"),
    out: Optional[Path] = typer.Option(None, help="results JSON (default: print it)"),
    every_checkpoint: bool = typer.Option(False, "--every-checkpoint",
                                          help="MODEL is a run dir: evaluate each new checkpoint, write eval/progression.*"),
    watch: bool = typer.Option(False, "--watch", help="MODEL is a run dir being trained: score each checkpoint as it "
                               "appears (beside the trainer, in this process), until the final step is scored"),
    poll: float = typer.Option(30.0, min=0.1, help="with --watch: seconds between looks for a new checkpoint"),
    idle_timeout: Optional[float] = typer.Option(None, "--idle-timeout", min=1.0,
                                                 help="with --watch: give up after this many seconds without a new checkpoint"),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:1 (default auto: the GPU when there is one)"),
) -> None:
    """Evaluate a model (or every checkpoint of a run) with lm-evaluation-harness, in process."""
    from zagreus.recipe import EVAL_BATCH_SIZE

    defaults = _recipe_defaults(model)
    task_list = _split(tasks) or defaults.get("tasks") or []
    if not task_list:
        raise UserError("no tasks: pass --tasks T1,T2 (e.g. zagreus_arc_it) or set eval.tasks in the run's recipe")
    fewshot = num_fewshot if num_fewshot is not None else defaults.get("num_fewshot")
    from zagreus.eval.suites import expand  # suite names (report-ita, ...) -> tasks, their few-shot counts

    task_list, fewshot = expand(task_list, fewshot)
    lim = limit if limit is not None else defaults.get("limit")
    if lim is not None and lim >= 1:
        lim = int(lim)
    bs = batch_size or defaults.get("batch_size") or EVAL_BATCH_SIZE
    ddir = data_dir or defaults.get("data_dir")
    if watch:
        from zagreus.eval.progression import watch_run
        from zagreus.rundir import RunDir

        os.nice(10)  # beside a trainer, on its CPUs or feeding its GPUs: the trainer's processes come first
        watch_run(model, task_list, num_fewshot=fewshot, limit=lim, batch_size=bs, data_dir=ddir, device=device,
                  poll=poll, idle_timeout=idle_timeout, echo=typer.echo)
        typer.echo(RunDir(model).progression().read_text(encoding="utf-8"))
        return
    if every_checkpoint:
        from zagreus.eval.progression import evaluate_run
        from zagreus.rundir import RunDir

        steps, files = evaluate_run(model, task_list, num_fewshot=fewshot, limit=lim, batch_size=bs,
                                    data_dir=ddir, device=device)
        typer.echo(f"evaluated {len(steps)} new checkpoint(s): {', '.join(f'step-{s}' for s in steps) or 'none'}")
        typer.echo(RunDir(model).progression().read_text(encoding="utf-8"))
        typer.echo("wrote " + ", ".join(str(f) for f in files))
        return
    from zagreus.eval.run import evaluate as evaluate_model, write_results

    results = evaluate_model(model, task_list, num_fewshot=fewshot, limit=lim, batch_size=bs, data_dir=ddir, device=device)
    for task, entry in results["tasks"].items():
        typer.echo(f"{task}: {entry['metric']} = {entry['value']:.4f}  ({json.dumps(entry['metrics'])}, n={entry['samples']})")
    if out is not None:
        write_results(results, out)
        typer.echo(f"wrote {out}")
    else:
        typer.echo(json.dumps(results, indent=2, default=str))


def compare(
    results: list[Path] = typer.Argument(..., help="results: `zagreus eval --out` JSON files, lm-eval's results_*.json "
                                          "or the folder `lm-eval --output_path` wrote (its newest file)"),
    out: Optional[Path] = typer.Option(None, help="output folder (default with --run: the run's eval/)"),
    run: Optional[Path] = typer.Option(None, "--run", help="run directory: write into its eval/ (compare.* or delta.*), "
                                       "where `zagreus release` puts them in the model card"),
    delta: bool = typer.Option(False, "--delta", help="two results, BASE then FINE-TUNE: one row per task with both "
                               "scores and Δ = fine-tune − base, and the average (delta.md, delta.csv, delta.png)"),
) -> None:
    """Models side by side (task scores by language, per-language and overall averages, bar chart), or with
    --delta a base model against its fine-tune, task by task."""
    if out is None and run is None:
        raise UserError("no output folder: pass --out DIR, or --run RUN_DIR to write into the run's eval/")
    if out is None:
        from zagreus.rundir import RunDir

        if not RunDir.looks_like_run(run):
            raise UserError(f"{run}: not a run directory (no recipe.yaml, checkpoints/ or data/manifest.json); "
                            f"pass the run's folder or --out DIR")
        out = RunDir(run).eval
    if delta:
        from zagreus.eval.delta import delta as delta_table

        if len(results) != 2:
            raise UserError(f"--delta takes two results, BASE then FINE-TUNE; got {len(results)}")
        files = delta_table(results[0], results[1], out)
    else:
        from zagreus.eval.compare import compare as compare_results

        files = compare_results(results, out)
    typer.echo(files[0].read_text(encoding="utf-8"))
    typer.echo("wrote " + ", ".join(str(f) for f in files))


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)
    app.command("compare")(compare)
