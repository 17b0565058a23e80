"""Score against training step: evaluate every checkpoint of a run once, then tables and a plot.

Results are cached per checkpoint in RUN_DIR/eval/step-N.json (the checkpoint folder's name),
so a rerun evaluates only checkpoints, or tasks, not seen before with the same settings
(few-shot count, limit). progression.{md,csv,png} are rewritten from all cached results: one
row per checkpoint, one column per task named with its metric as in the report
(`arc_it (acc_norm)`), and the row's average.
"""

from __future__ import annotations

import logging
from pathlib import Path

from zagreus.errors import UserError
from zagreus.eval import run
from zagreus.eval.registry import check_task_names, display_name, report_metric
from zagreus.eval.tables import mean, write_tables
from zagreus.recipe import EVAL_BATCH_SIZE
from zagreus.rundir import STEP_DIR, RunDir

log = logging.getLogger(__name__)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the run's complete checkpoints, by step; UserError when there are none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    found = RunDir(run_dir).list_checkpoints()
    if not found:
        raise UserError(f"{run_dir}: no checkpoints (expected {run_dir / 'checkpoints'}/step-N folders with meta.json); "
                        f"run `zagreus pretrain` first or pass a model folder without --every-checkpoint")
    return found


def _settings(num_fewshot: int | dict[str, int] | None, task: str, limit: int | float | None) -> dict:
    k = num_fewshot.get(task) if isinstance(num_fewshot, dict) else num_fewshot
    return {"num_fewshot": k, "limit": limit}


def _cached_tasks(cache: dict, tasks: list[str], num_fewshot, limit) -> set[str]:
    done = set()
    for task in tasks:
        entry = cache.get("tasks", {}).get(task)
        if entry and entry.get("settings") == _settings(num_fewshot, task, limit):
            done.add(task)
    return done


def evaluate_run(run_dir: Path, tasks: list[str], num_fewshot: int | dict[str, int] | None = None,
                 limit: int | float | None = None, batch_size: int = EVAL_BATCH_SIZE, data_dir: str | Path | None = None,
                 device: str | None = None) -> tuple[list[int], list[Path]]:
    """Evaluate the checkpoints not yet evaluated; (steps evaluated now, files written)."""
    from tqdm import tqdm

    if not tasks:
        raise UserError("no tasks given; pass --tasks T1,T2 or set eval.tasks in the recipe")
    check_task_names(tasks)
    checkpoints = list_checkpoints(run_dir)
    layout = RunDir(Path(run_dir))
    evaluated = []
    for step, folder in tqdm(checkpoints, desc="checkpoints", unit="ckpt"):
        cache_path = layout.eval_result(folder)
        cache = run.read_results(cache_path) if cache_path.is_file() else {"step": step, "tasks": {}}
        todo = [t for t in tasks if t not in _cached_tasks(cache, tasks, num_fewshot, limit)]
        if not todo:
            continue
        log.info("evaluating %s on %s", folder, ", ".join(todo))
        fewshot = {t: k for t in todo if (k := _settings(num_fewshot, t, limit)["num_fewshot"]) is not None}
        result = run.evaluate(folder, todo, num_fewshot=fewshot, limit=limit, batch_size=batch_size,
                              data_dir=data_dir, device=device)
        for task, entry in result["tasks"].items():
            cache["tasks"][task] = {**entry, "settings": _settings(num_fewshot, task, limit)}
        cache.update(step=step, checkpoint=str(folder), lm_eval_version=result["lm_eval_version"],
                     zagreus_version=result["zagreus_version"])
        run.write_results(cache, cache_path)
        evaluated.append(step)
    return evaluated, write_progression(layout, tasks)


def _score(entry: dict, task: str) -> float | None:
    """The report's metric, or the one the task reported when it has no such metric."""
    return entry.get("metrics", {}).get(report_metric(task), entry.get("value"))


def _column(task: str) -> str:
    return f"{display_name(task)} ({report_metric(task)})"


def write_progression(layout: RunDir, tasks: list[str]) -> list[Path]:
    """eval/progression.md/.csv/.png from every cached eval/step-N.json."""
    rows = []
    for path in sorted(layout.eval.glob("step-*.json")):
        m = STEP_DIR.match(path.stem)
        if not m:
            continue
        cached = run.read_results(path)["tasks"]
        scores = [_score(cached.get(t, {}), t) for t in tasks]
        rows.append((int(m.group(1)), scores))
    rows.sort()
    headers = ["checkpoint", *(_column(t) for t in tasks), "average"]
    table = [[f"step-{step}", *scores, mean(scores)] for step, scores in rows]
    files = write_tables(layout.progression(None), headers, table,
                         title=f"Checkpoint progression. Metrics: {', '.join(_column(t) for t in tasks)}.")
    files.append(_plot(layout.progression("png"), rows, tasks))
    return files


def _plot(out: Path, rows: list[tuple[int, list[float | None]]], tasks: list[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, task in enumerate(tasks):
        points = [(step, scores[i]) for step, scores in rows if scores[i] is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=_column(task))
    ax.set_xlabel("training step")
    ax.set_ylabel("score")
    ax.set_title("Score progression across checkpoints")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
