"""Task names: lm-eval's own tasks plus the `zagreus_*` tasks shipped in `eval/tasks/`.

A shipped task reads its data from one of two places:
- offline only (`dataset_path: json`, the okapi/English twins): `dataset_kwargs.data_files`,
  names relative to `--data-dir`;
- the hub or local files (the Portuguese leaderboard tasks, ifeval-ita): `dataset_path` on the hub,
  unless `--data-dir` holds every file of `metadata.local_files` (hub split -> file name); then
  those files, as JSON lines or a JSON array (e.g. `datasets.load_dataset(...)[split].to_json(name)`).
`task_specs` turns a list of names into what lm-eval's TaskManager loads, with the files joined
to `--data-dir`. Unknown names end in a UserError listing the closest known ones.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import os
import re
from pathlib import Path

from zagreus.errors import UserError

TASKS_DIR = Path(__file__).parent / "tasks"

# The metric the report quotes for each task family, first match wins (acc_norm: log-likelihood per
# character; the Portuguese leaderboard's f1_macro for its classification tasks, pearson for STS).
_REPORT_METRIC = [
    (re.compile(r"^evalita-mp_(hs|sa|wic|ls|re|ner)"), "f1"),
    (re.compile(r"^evalita-mp_sum"), "rouge1"),
    (re.compile(r"(^|_)(m_)?mmlu"), "acc"),
    (re.compile(r"(^|_)(hellaswag|arc)"), "acc_norm"),
    (re.compile(r"(^|_)ifeval"), "prompt_level_strict_acc"),
    (re.compile(r"^assin2_sts"), "pearson"),
    (re.compile(r"^(assin2_rte|faquad_nli|hatebr_offensive|portuguese_hate_speech|tweetsentbr)"), "f1_macro"),
]
# Families whose name carries no language suffix (checked on the name without `zagreus_`).
_FAMILY_LANGUAGE = [
    (re.compile(r"^(ifeval-ita|ifeval_ita|evalita)"), "it"),
    (re.compile(r"^(enem_challenge|enem|bluex|oab_exams|assin2?_|faquad|hatebr|portuguese_|tweetsentbr)"), "pt"),
]
_LANGUAGE = re.compile(r"_(it|es|fr|pt|en|de|ca|eu|gl|nl)$")
# What lm-eval's IFEval checkers import (lm-eval's `ifeval` extra), by import name.
_IFEVAL_MODULES = ("langdetect", "immutabledict", "nltk")


def local_task_names() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("zagreus_*.yaml"))


def report_metric(task: str) -> str:
    """acc_norm for ARC and HellaSwag, acc for MMLU, IFEval's prompt-level strict accuracy, the
    Portuguese leaderboard's f1_macro (pearson for assin2_sts), Evalita's f1/rouge1/acc, else acc."""
    name = display_name(task)
    for pattern, metric in _REPORT_METRIC:
        if pattern.search(name):
            return metric
    return "acc"


def task_language(task: str) -> str:
    """ISO code of a task: the known families (ifeval-ita and evalita: it; the Portuguese leaderboard:
    pt), else the name's suffix (arc_it -> it), else English (the unsuffixed lm-eval tasks)."""
    name = display_name(task)
    for pattern, language in _FAMILY_LANGUAGE:
        if pattern.search(name):
            return language
    m = _LANGUAGE.search(name)
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


def _plain_yaml(name: str) -> dict:
    """A shipped task's YAML without lm-eval (its `!function` tags read as strings): which files, which hub."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: loader.construct_scalar(node))
    return yaml.load((TASKS_DIR / f"{name}.yaml").read_text(encoding="utf-8"), Loader=Loader)


def _data_files(name: str, cfg: dict, data_dir: Path | None) -> dict[str, Path] | None:
    """{split: file} a shipped task reads from `data_dir`, or None when it reads the hub.

    Offline-only tasks need every file; hub tasks read their `metadata.local_files` when all are
    in `data_dir`, the hub when none is (a part of them is an error: which copy was meant?).
    """
    offline_only = cfg.get("dataset_path") == "json"
    names = (cfg["dataset_kwargs"]["data_files"] if offline_only else (cfg.get("metadata") or {}).get("local_files")) or {}
    if data_dir is None:
        if offline_only:
            raise UserError(f"task {name} reads local files; pass --data-dir DIR (the folder holding "
                            f"{', '.join(names.values())})")
        return None
    paths = {split: Path(data_dir) / rel for split, rel in names.items()}
    missing = [rel for split, rel in names.items() if not paths[split].is_file()]
    if not missing:
        return {split: path.resolve() for split, path in paths.items()}
    if not offline_only and len(missing) == len(names):
        return None
    hub = "" if offline_only else f" (or none of them, to read {cfg['dataset_path']} from the hub)"
    raise UserError(f"task {name}: {Path(data_dir) / missing[0]} not found; put {', '.join(missing)} in "
                    f"--data-dir{hub} or choose another task")


def _local_config(name: str, data_dir: Path | None) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    files = _data_files(name, _plain_yaml(name), data_dir)
    cfg = load_yaml(TASKS_DIR / f"{name}.yaml", resolve_func=True)
    if files is None:
        return cfg
    cfg["dataset_path"] = "json"
    cfg.pop("dataset_name", None)
    cfg["dataset_kwargs"] = {**(cfg.get("dataset_kwargs") or {}), "data_files": {s: str(p) for s, p in files.items()}}
    return cfg


def reads_hub(names: list[str], data_dir: str | Path | None = None) -> bool:
    """Whether any of the tasks fetches data from the hub (lm-eval's own tasks always may)."""
    local = set(local_task_names())
    data = Path(os.path.expanduser(str(data_dir))) if data_dir is not None else None
    def hub(n: str) -> bool:
        cfg = _plain_yaml(n)
        return cfg.get("dataset_path") != "json" and _data_files(n, cfg, data) is None

    return any(n not in local or hub(n) for n in names)


def hub_dataset(name: str) -> str | None:
    """The hub dataset of a shipped task that can read it (path, and /config when it has one), else None."""
    cfg = _plain_yaml(name)
    if cfg.get("dataset_path") == "json":
        return None
    return "/".join(x for x in (cfg["dataset_path"], cfg.get("dataset_name")) if x)


def local_files(name: str) -> list[str]:
    """The file names a shipped task reads from --data-dir."""
    cfg = _plain_yaml(name)
    files = cfg["dataset_kwargs"]["data_files"] if cfg.get("dataset_path") == "json" else cfg["metadata"]["local_files"]
    return list(files.values())


def check_task_requirements(names: list[str]) -> None:
    """UserError before any model work when an IFEval-scored task lacks the packages its checkers import."""
    ifeval = [n for n in names if re.search(r"(^|_)ifeval", display_name(n))]
    missing = [m for m in _IFEVAL_MODULES if importlib.util.find_spec(m) is None] if ifeval else []
    if missing:
        raise UserError(f"task {ifeval[0]} is scored by lm-eval's IFEval checkers, which need {', '.join(missing)}: "
                        f"pip install 'lm-eval[ifeval]' (or {' '.join(missing)})")


def check_task_names(names: list[str], suites: list[str] = ()) -> None:
    """UserError for the first unknown name, with the closest lm-eval and zagreus names (and `suites`' names)."""
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
        named = all_names | set(suites)
        matches = difflib.get_close_matches(name, sorted(named | set(short)), n=8, cutoff=0.6)
        close = list(dict.fromkeys(x for m in matches for x in (m if m in named else None, short.get(m)) if x))[:6]
        hint = f"closest: {', '.join(close)}" if close else "run `lm-eval ls tasks` for lm-eval's tasks"
        listed = f"; suites: {', '.join(suites)}" if suites else ""
        raise UserError(f"unknown task '{name}'; {hint} (offline tasks: {', '.join(local_task_names())}{listed})")


def offline_alternative(task: str) -> str | None:
    """The shipped offline task mirroring an lm-eval task (arc_it -> zagreus_arc_it), if any."""
    local = set(local_task_names())
    for candidate in (f"zagreus_{task}", f"zagreus_{task}_en"):
        if candidate in local:
            return candidate
    return None


def task_specs(names: list[str], data_dir: str | Path | None = None) -> list:
    """lm-eval task specs: names for lm-eval's own tasks, full configs for the shipped ones."""
    check_task_names(names)
    check_task_requirements(names)
    local = set(local_task_names())
    data = Path(os.path.expanduser(str(data_dir))) if data_dir is not None else None
    return [_local_config(n, data) if n in local else n for n in names]
