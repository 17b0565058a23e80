"""Evaluate one model on lm-eval tasks with our in-process evaluator, and the results format.

`evaluate(...)` runs lm-eval's `simple_evaluate` with the `zagreus` model type and returns a
JSON-ready dict: per task the report's metric (acc_norm for ARC/HellaSwag, acc for MMLU)
and every metric lm-eval computed. `quick_mc_eval` is the small version the pretraining loop
can call on the model in memory.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from zagreus import __version__
from zagreus.errors import UserError
from zagreus.eval.registry import (check_task_names, hub_dataset, local_files, local_task_names, offline_alternative, reads_hub,
                                   report_metric, task_manager, task_specs)
from zagreus.eval.suites import expand, suite_names
from zagreus.recipe import EVAL_BATCH_SIZE

log = logging.getLogger(__name__)


def task_entry(task: str, metrics: dict[str, Any], n_samples: int | None, num_fewshot: int | None) -> dict:
    """Our results entry of a task from lm-eval's metrics ({"acc,none": .., "acc_stderr,none": ..})."""
    values = {k.split(",")[0]: v for k, v in metrics.items()
              if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    metric = report_metric(task)
    if metric not in values and values:
        metric = next(iter(values))
    return {"metric": metric, "value": values.get(metric), "metrics": values, "samples": n_samples,
            "num_fewshot": num_fewshot}


def _quiet_offline(local_only: bool) -> None:
    # Local task files need no hub look-ups; skipping them avoids timeouts on machines offline.
    # (Shipped tasks that fall back to the hub, for want of their files in --data-dir, need them.)
    if local_only:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_tasks(lm, tasks: list[str], num_fewshot: int | dict[str, int] | None = None, limit: int | float | None = None,
              data_dir: str | Path | None = None, log_samples: bool = False) -> tuple[dict, dict]:
    """(per-task summary, raw lm-eval output) for an lm-eval LM on the named tasks.

    tasks: task names or suite names (suites.SUITES: report-ita, pt-leaderboard, ...), mixed freely.
    num_fewshot: one number for every task, or a per-task mapping (tasks not named use their
    suite's count, else their default).
    """
    tasks, num_fewshot = expand(tasks, num_fewshot)
    offline_only = all(t in local_task_names() for t in tasks)  # then lm-eval's own task index is not needed
    _quiet_offline(not reads_hub(tasks, data_dir))
    specs = task_specs(tasks, data_dir)
    from lm_eval import simple_evaluate  # after the offline switches above: datasets reads them on import

    groups: dict[int | None, list] = {}
    for name, spec in zip(tasks, specs):
        k = num_fewshot.get(name) if isinstance(num_fewshot, dict) else num_fewshot
        groups.setdefault(k, []).append(spec)
    from zagreus.eval.tiebreak import TiebreakReport

    summary: dict[str, dict] = {}
    raw: dict[str, Any] = {"results": {}, "samples": {}, "group_subtasks": {}}
    tiebreak = TiebreakReport()
    take_report = getattr(lm, "take_tiebreak_report", None)  # ours has one; lm-eval's HFLM not
    for k, group in groups.items():
        try:
            with _no_environment_report(), _imports_frozen():
                out = simple_evaluate(model=lm, tasks=group, num_fewshot=k, limit=limit,
                                      task_manager=task_manager(offline_only), log_samples=log_samples,
                                      bootstrap_iters=0, verbosity=None)
        except ConnectionError as exc:
            raise UserError(_offline_hint(group, exc)) from None
        report = take_report() if take_report else TiebreakReport()
        tiebreak.merge(report)
        for task, metrics in out["results"].items():
            n = out.get("n-samples", {}).get(task, {}).get("effective")
            summary[task] = task_entry(task, metrics, n, k)
            if report.requests:
                summary[task]["rescored"] = report.rescored_items.get(task, 0)
        raw["results"].update(out["results"])
        raw["samples"].update(out.get("samples", {}))
        raw["group_subtasks"].update(out.get("group_subtasks") or {})
    raw["tiebreak"] = tiebreak.as_dict() if tiebreak.requests else None
    return summary, raw


@contextlib.contextmanager
def _imports_frozen():
    """torch, lm-eval, datasets and pandas leave ~280,000 long-lived objects, which each full
    collection within simple_evaluate scans again (0.15 s apiece on one core, two or three per
    run). Within the block the collector skips what existed before it; afterwards those objects
    are collectable again, so a loop of runs (eval --watch) leaks nothing."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def _no_environment_report():
    """simple_evaluate ends by describing the machine into its output: torch's collect_env (which
    runs pip and other programs), `git describe`, the transformers import for its version; 1.4 s
    per call, for keys run_tasks does not keep (the results file records the versions itself).
    lm-eval's evaluator skips that within the block."""
    from lm_eval import evaluator

    saved = evaluator.add_env_info, evaluator.get_git_commit_hash
    evaluator.add_env_info, evaluator.get_git_commit_hash = (lambda storage: None), (lambda: None)
    try:
        yield
    finally:
        evaluator.add_env_info, evaluator.get_git_commit_hash = saved


def _offline_hint(group: list, exc: Exception) -> str:
    hub = [t for t in group if isinstance(t, str)]
    swaps = [f"{t} -> {alt}" for t in hub if (alt := offline_alternative(t))]
    hint = f"; offline, use the shipped tasks with --data-dir ({', '.join(swaps)})" if swaps else ""
    # Shipped tasks on the hub: their configs name the hub dataset; the same files in --data-dir replace it.
    shipped = [t["task"] for t in group if isinstance(t, dict) and t.get("dataset_path") != "json"]
    files = [f"{t}: {', '.join(local_files(t))} ({hub_dataset(t)})" for t in shipped]
    hint += f"; offline, put the hub splits in --data-dir as {'; '.join(files)}" if files else ""
    return f"tasks {', '.join(hub + shipped)}: the dataset could not be fetched from the Hugging Face hub ({exc}){hint}"


def evaluate(model: str | Path, tasks: list[str], num_fewshot: int | dict[str, int] | None = None,
             limit: int | float | None = None, batch_size: int = EVAL_BATCH_SIZE, data_dir: str | Path | None = None,
             device: str | None = None) -> dict:
    """Results dict for a model on the named tasks: an export, checkpoint or run dir (our fast scorer),
    or any other Hugging Face causal LM, a local folder or a hub id (lm-eval's HFLM); `backend` says which."""
    from zagreus.eval.backend import backend_of, local_path
    # lm.py imports lm-eval (seconds): `zagreus compare` and results I/O need none of it.
    from zagreus.eval.lm import make_hf_lm, make_lm

    if not tasks:
        raise UserError("no tasks given; pass --tasks T1,T2 (e.g. zagreus_arc_it) or set eval.tasks in the recipe")
    tasks, num_fewshot = expand(tasks, num_fewshot)  # suite names -> tasks and their few-shot counts
    check_task_names(tasks, suites=suite_names())
    start = time.perf_counter()
    backend = backend_of(model)
    if backend == "zagreus":
        lm = make_lm(model, batch_size=batch_size, device=device)
    else:
        local = local_path(model)
        lm = make_hf_lm(local if local.exists() else model, batch_size=batch_size, device=device)
    summary, raw = run_tasks(lm, tasks, num_fewshot=num_fewshot, limit=limit, data_dir=data_dir)
    return {
        "model": str(model), "backend": backend, "tasks": summary, "tiebreak": raw["tiebreak"], "limit": limit,
        "num_fewshot": num_fewshot, **({"group_subtasks": raw["group_subtasks"]} if raw["group_subtasks"] else {}),
        "data_dir": str(data_dir) if data_dir else None, "seconds": round(time.perf_counter() - start, 2),
        "zagreus_version": __version__, "lm_eval_version": _lm_eval_version(),
    }


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm-eval")


def quick_mc_eval(model, tokenizer, task: str = "zagreus_arc_it", limit: int | None = 200,
                  data_dir: str | Path | None = None, num_fewshot: int = 0, batch_size: int = EVAL_BATCH_SIZE) -> dict[str, float]:
    """A multiple-choice score for the model in memory, e.g. every N pretraining steps.

    Returns lm-eval's metrics for the task ({'acc': .., 'acc_norm': ..}). Puts the model in
    eval mode and back to train mode if it was training. Runs on the model's device, in
    the process: no export, no reload.
    """
    from zagreus.eval.lm import make_lm  # lm-eval, as in evaluate()

    was_training = model.training
    try:
        summary, _ = run_tasks(make_lm(model, tokenizer, batch_size=batch_size), [task],
                               num_fewshot=num_fewshot, limit=limit, data_dir=data_dir)
    finally:
        model.train(was_training)
    return dict(summary[task]["metrics"])


def write_results(results: dict, out: Path) -> None:
    """Write atomically, so an interrupted run never leaves a truncated cache file."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(out)


def read_results(path: Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: results file not found; pass files written by `zagreus eval --out`") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); re-run `zagreus eval`") from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        raise UserError(f"{path}: no 'tasks' mapping; pass results written by `zagreus eval --out`")
    return data
