"""Task names: lm-eval's own tasks plus the offline `zagreus_*` tasks shipped in `eval/tasks/`.

An offline task's YAML names its files relative to the data folder; `task_specs` turns a list
of names into what lm-eval's TaskManager loads, with those files joined to `--data-dir`.
Unknown names end in a UserError listing the closest known ones.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from pathlib import Path

from zagreus.errors import UserError

TASKS_DIR = Path(__file__).parent / "tasks"

# The metric the report quotes for each task family (acc_norm: log-likelihood per character).
_REPORT_METRIC = [
    (re.compile(r"(^|_)(m_)?mmlu"), "acc"),
    (re.compile(r"(^|_)(hellaswag|arc)"), "acc_norm"),
    (re.compile(r"(^|_)ifeval"), "prompt_level_strict_acc"),
]
_LANGUAGE = re.compile(r"_(it|es|fr|pt|en|de)$")


def local_task_names() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("zagreus_*.yaml"))


def report_metric(task: str) -> str:
    """acc_norm for ARC and HellaSwag, acc for MMLU, IFEval's prompt-level strict accuracy, else acc."""
    for pattern, metric in _REPORT_METRIC:
        if pattern.search(task):
            return metric
    return "acc"


def task_language(task: str) -> str:
    """ISO code from the name's suffix (arc_it -> it); English for the unsuffixed lm-eval tasks."""
    m = _LANGUAGE.search(task)
    return m.group(1) if m else "en"


def display_name(task: str) -> str:
    """The report's name: zagreus_arc_it -> arc_it."""
    return task.removeprefix("zagreus_")


@functools.lru_cache(maxsize=2)
def task_manager(offline_only: bool = False):
    """lm-eval's TaskManager over our task folder, and lm-eval's own tasks unless `offline_only`.

    Indexing lm-eval's task folder parses its ~14,000 YAML files (7-10 s on one core, once per
    process); runs of our offline tasks alone need none of them, so they skip it.
    """
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=not offline_only)


def _local_config(name: str, data_dir: Path | None) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(TASKS_DIR / f"{name}.yaml", resolve_func=True)
    if data_dir is None:
        raise UserError(f"task {name} reads local files; pass --data-dir DIR (the folder holding "
                        f"{', '.join(cfg['dataset_kwargs']['data_files'].values())})")
    files = {}
    for split, rel in cfg["dataset_kwargs"]["data_files"].items():
        path = Path(data_dir) / rel
        if not path.is_file():
            raise UserError(f"task {name}: {path} not found; put {rel} in --data-dir or choose another task")
        files[split] = str(path.resolve())
    cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": files}
    return cfg


def check_task_names(names: list[str]) -> None:
    """UserError for the first unknown name, with the closest lm-eval and zagreus names."""
    known = set(local_task_names())
    unknown = [n for n in names if n not in known]
    if not unknown:
        return
    all_names = set(task_manager().all_tasks) | known
    for name in unknown:
        if name in all_names or Path(name).is_file():
            continue
        # Offline tasks also answer to their short name (arc_it -> zagreus_arc_it).
        short = {display_name(n): n for n in known}
        matches = difflib.get_close_matches(name, sorted(all_names | set(short)), n=8, cutoff=0.6)
        close = list(dict.fromkeys(x for m in matches for x in (m if m in all_names else None, short.get(m)) if x))[:6]
        hint = f"closest: {', '.join(close)}" if close else "run `lm-eval ls tasks` for lm-eval's tasks"
        raise UserError(f"unknown task '{name}'; {hint} (offline tasks: {', '.join(local_task_names())})")


def offline_alternative(task: str) -> str | None:
    """The shipped offline task mirroring an lm-eval task (arc_it -> zagreus_arc_it), if any."""
    local = set(local_task_names())
    for candidate in (f"zagreus_{task}", f"zagreus_{task}_en"):
        if candidate in local:
            return candidate
    return None


def task_specs(names: list[str], data_dir: str | Path | None = None) -> list:
    """lm-eval task specs: names for lm-eval's own tasks, full configs for the offline ones."""
    check_task_names(names)
    local = set(local_task_names())
    data = Path(os.path.expanduser(str(data_dir))) if data_dir is not None else None
    return [_local_config(n, data) if n in local else n for n in names]
