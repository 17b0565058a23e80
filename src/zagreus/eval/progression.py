"""Score against training step: evaluate every checkpoint of a run once, then tables and a plot.

Results are cached per checkpoint in RUN_DIR/eval/step-N.json (the checkpoint folder's name),
so a rerun evaluates only checkpoints, or tasks, not seen before with the same settings
(few-shot count, limit). progression.{md,csv,png} are rewritten from all cached results: one
row per checkpoint, one column per task named with its metric as in the report
(`arc_it (acc_norm)`), and the row's average.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from zagreus.errors import UserError
from zagreus.eval import run
from zagreus.eval.registry import check_task_names, display_name, report_metric
from zagreus.eval.tables import mean, write_tables
from zagreus.recipe import EVAL_BATCH_SIZE
from zagreus.rundir import META, STEP_DIR, RunDir, read_meta

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


def _evaluate_checkpoint(layout: RunDir, step: int, folder: Path, tasks: list[str], num_fewshot, limit,
                         batch_size: int, data_dir, device: str | None) -> bool:
    """Score one checkpoint on the tasks not cached for it yet; False when there was nothing to do or
    the trainer pruned the checkpoint while it was being read."""
    cache = _cached(layout, folder) or {"step": step, "tasks": {}}
    todo = [t for t in tasks if t not in _cached_tasks(cache, tasks, num_fewshot, limit)]
    if not todo:
        return False
    log.info("evaluating %s on %s", folder, ", ".join(todo))
    fewshot = {t: k for t in todo if (k := _settings(num_fewshot, t, limit)["num_fewshot"]) is not None}
    try:
        result = run.evaluate(folder, todo, num_fewshot=fewshot, limit=limit, batch_size=batch_size,
                              data_dir=data_dir, device=device)
    except Exception:
        if (folder / META).is_file():
            raise
        log.warning("%s was pruned by the trainer while being evaluated; skipped (set checkpoint.keep_every to "
                    "keep such rows)", folder)
        return False
    for task, entry in result["tasks"].items():
        cache["tasks"][task] = {**entry, "settings": _settings(num_fewshot, task, limit)}
    cache.update(step=step, checkpoint=str(folder), lm_eval_version=result["lm_eval_version"],
                 zagreus_version=result["zagreus_version"])
    run.write_results(cache, layout.eval_result(folder))
    return True


def evaluate_run(run_dir: Path, tasks: list[str], num_fewshot: int | dict[str, int] | None = None,
                 limit: int | float | None = None, batch_size: int = EVAL_BATCH_SIZE, data_dir: str | Path | None = None,
                 device: str | None = None) -> tuple[list[int], list[Path]]:
    """Evaluate the checkpoints not yet evaluated; (steps evaluated now, files written)."""
    from tqdm import tqdm

    if not tasks:
        raise UserError("no tasks given; pass --tasks T1,T2 or set eval.tasks in the recipe")
    check_task_names(tasks)
    layout = RunDir(Path(run_dir))
    evaluated = [step for step, folder in tqdm(list_checkpoints(run_dir), desc="checkpoints", unit="ckpt")
                 if _evaluate_checkpoint(layout, step, folder, tasks, num_fewshot, limit, batch_size, data_dir, device)]
    return evaluated, write_progression(layout, tasks)


def _run_plan(meta: dict) -> tuple[int | None, int | None]:
    """(final step, interval of the checkpoints never pruned) from a checkpoint's recorded recipe."""
    pretrain = meta.get("recipe", {}).get("pretrain", {})
    ckpt = pretrain.get("checkpoint", {})
    permanent = ckpt["keep_every"] * ckpt["every"] if ckpt.get("keep_every") else None
    return pretrain.get("steps"), permanent


def _next_checkpoint(pending: list[tuple[int, Path]], permanent_every: int | None) -> tuple[int, Path]:
    """The checkpoints pruning never deletes first, oldest first (their rows are the table's); then the
    newest of the rest, which is the likeliest to survive and the freshest news."""
    kept = [c for c in pending if permanent_every and c[0] % permanent_every == 0]
    return kept[0] if kept else pending[-1]


def watch_run(run_dir: Path, tasks: list[str], num_fewshot: int | dict[str, int] | None = None,
              limit: int | float | None = None, batch_size: int = EVAL_BATCH_SIZE, data_dir: str | Path | None = None,
              device: str | None = None, poll: float = 30.0, idle_timeout: float | None = None,
              echo: Callable[[str], None] = log.info) -> list[int]:
    """Score each checkpoint of a training run as it appears, rewriting eval/progression.* after each,
    until the checkpoint of the run's final step is scored; returns the steps scored.

    The run may still be starting (no checkpoint yet). With `idle_timeout`, no new checkpoint for
    that many seconds (the trainer died, or waits in a queue) ends the watch with a UserError.
    """
    if not tasks:
        raise UserError("no tasks given; pass --tasks T1,T2 or set eval.tasks in the recipe")
    check_task_names(tasks)
    layout = RunDir(Path(run_dir))
    scored: list[int] = []
    last_news = time.monotonic()
    while True:
        present = layout.list_checkpoints()
        plan = _run_plan(read_meta(present[-1][1])) if present else (None, None)
        pending = [(s, f) for s, f in present if not _cached_tasks(_cached(layout, f), tasks, num_fewshot, limit) >= set(tasks)]
        if pending:
            step, folder = _next_checkpoint(pending, plan[1])
            if _evaluate_checkpoint(layout, step, folder, tasks, num_fewshot, limit, batch_size, data_dir, device):
                scored.append(step)
                write_progression(layout, tasks)
                echo(f"scored step-{step}")
            last_news = time.monotonic()
            continue
        if present and plan[0] is not None and present[-1][0] >= plan[0]:
            write_progression(layout, tasks)
            echo(f"the run's final step {plan[0]} is scored; {len(scored)} checkpoint(s) scored by this watch")
            return scored
        if idle_timeout is not None and time.monotonic() - last_news > idle_timeout:
            raise UserError(f"{run_dir}: no new checkpoint for {idle_timeout:.0f} s (is the training job running?); "
                            f"scored {len(scored)}, rerun `zagreus eval {run_dir} --watch` to go on")
        time.sleep(poll)


def _cached(layout: RunDir, folder: Path) -> dict:
    path = layout.eval_result(folder)
    return run.read_results(path) if path.is_file() else {}


def _score(entry: dict, task: str) -> float | None:
    """The report's metric, or the one the task reported when it has no such metric."""
    return entry.get("metrics", {}).get(report_metric(task), entry.get("value"))


def _column(task: str) -> str:
    return f"{display_name(task)} ({report_metric(task)})"


def write_progression(layout: RunDir, tasks: list[str]) -> list[Path]:
    """eval/progression.md/.csv/.png from the cached eval/step-N.json of every checkpoint the run still has
    (a checkpoint pruned after it was scored leaves its results file, not its row)."""
    rows = []
    for path in sorted(layout.eval.glob("step-*.json")):
        m = STEP_DIR.match(path.stem)
        if not m or not (layout.checkpoints / path.stem / META).is_file():
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
