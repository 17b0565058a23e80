"""Models side by side (the report's Table 7): model x task grouped by language, with the
average of each language and the overall average (the mean of the language averages, the
report's *Media_Totale*), as Markdown, CSV and a grouped bar chart.

Reads both results formats into one shape (`load_scores`): what `zagreus eval --out` writes
(a `tasks` mapping) and what `lm-eval --output_path` writes (`results_<timestamp>.json` with a
`results` mapping of "metric,filter" keys, or the folder lm-eval writes it into, whose newest
file is taken). A group that lm-eval scored as a whole (mmlu) is one column standing for its
subtasks, as MMLU_EN in the report; a group with no score of its own gives way to its subtasks.
An offline `zagreus_*` task shares the column of the lm-eval task it mirrors
(zagreus_arc_it with arc_it, zagreus_hellaswag_en with hellaswag).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from zagreus.errors import UserError, decode_utf8
from zagreus.eval.registry import display_name, report_metric, task_language
from zagreus.eval.run import task_entry
from zagreus.eval.tables import mean, write_tables

FORMATS = "a `zagreus eval --out` file or lm-eval's results_*.json (or the folder `lm-eval --output_path` wrote)"


def column(task: str) -> str:
    """The name a task is compared under: zagreus_arc_it -> arc_it, zagreus_arc_challenge_en -> arc_challenge."""
    name = display_name(task)
    return name.removesuffix("_en") if name != task else name


def results_file(path: Path) -> Path:
    """`path` itself, or the newest results_*.json of the lm-eval output folder it names."""
    path = Path(path)
    if not path.is_dir():
        return path
    found = sorted(path.glob("results_*.json"))
    if not found:
        models = sorted({p.parent for p in path.glob("*/results_*.json")})
        if len(models) > 1:
            raise UserError(f"{path}: holds lm-eval results of several models ({', '.join(m.name for m in models)}); "
                            f"pass one of those folders")
        found = sorted(models[0].glob("results_*.json")) if models else []
    if not found:
        raise UserError(f"{path}: no results_*.json here nor in a model folder below; pass {FORMATS}")
    return found[-1]  # the names end in the ISO timestamp of the run, so the last is the newest


def load_scores(path: Path) -> dict:
    """One model's scores from either format: {label, format, path, tasks: {task: entry}}.

    An entry is `zagreus eval`'s ({metric, value, metrics, samples, num_fewshot}) plus `depth`
    (0 for a task or a scored group, 1 for a subtask of a scored group, ...) and `group` (True
    when subtasks follow it). A task with no score at all is a UserError.
    """
    path = results_file(Path(path))
    try:
        data = json.loads(decode_utf8(path.read_bytes(), path))
    except FileNotFoundError:
        raise UserError(f"{path}: results file not found; pass {FORMATS}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg}); pass {FORMATS}") from None
    if isinstance(data, dict) and isinstance(data.get("tasks"), dict):
        fmt, tasks = "zagreus", _ours(data, path)
    elif isinstance(data, dict) and isinstance(data.get("results"), dict):
        fmt, tasks = "lm-eval", _lm_eval(data, path)
    else:
        raise UserError(f"{path}: neither a 'tasks' mapping (zagreus eval) nor a 'results' mapping (lm-eval); pass {FORMATS}")
    if not tasks:
        raise UserError(f"{path}: no task scores in it; pass {FORMATS}")
    return {"label": _model_name(data, fmt, path), "format": fmt, "path": path, "tasks": tasks}


def _ours(data: dict, path: Path) -> dict[str, dict]:
    out = {}
    for task, entry in data["tasks"].items():
        entry = dict(entry) if isinstance(entry, dict) else {}
        metrics = {k: v for k, v in (entry.get("metrics") or {}).items() if isinstance(v, (int, float))}
        if not metrics and isinstance(entry.get("value"), (int, float)):
            metrics = {entry.get("metric") or report_metric(task): entry["value"]}
        if not metrics:
            raise UserError(f"{path}: task {task} has no score (no 'metrics' nor 'value'); re-run `zagreus eval --out`")
        metric = report_metric(task) if report_metric(task) in metrics else entry.get("metric") or next(iter(metrics))
        if metric not in metrics:
            metric = next(iter(metrics))
        out[task] = {**entry, "metric": metric, "value": metrics[metric], "metrics": metrics}
    return _with_layout(out, data.get("group_subtasks") or {}, path)


def _lm_eval(data: dict, path: Path) -> dict[str, dict]:
    results = {t: m for t, m in data["results"].items() if isinstance(m, dict)}
    children = data.get("group_subtasks") or _children_from_aliases(results)
    groups = {g for g, kids in children.items() if kids} | set(data.get("groups") or {})
    out = {}
    for task, metrics in results.items():
        n = ((data.get("n-samples") or {}).get(task) or {}).get("effective")
        entry = task_entry(task, metrics, n, (data.get("n-shot") or {}).get(task))
        if not entry["metrics"] and task not in groups:
            raise UserError(f"{path}: task {task} has no metric ('acc,none', ...); pass the results_*.json "
                            f"`lm-eval --output_path` wrote, not a hand-edited copy")
        if entry["metrics"]:
            out[task] = entry
    return _with_layout(out, children, path)


def _children_from_aliases(results: dict) -> dict[str, list[str]]:
    """Older lm-eval files have no group_subtasks; their aliases are indented (" - humanities") below their group."""
    children: dict[str, list[str]] = {}
    stack: list[tuple[int, str]] = []
    for name, entry in results.items():
        alias = str(entry.get("alias", name))
        depth = max(1, len(alias) - len(alias.lstrip(" "))) if alias.lstrip(" ").startswith("- ") else 0
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            children.setdefault(stack[-1][1], []).append(name)
        stack.append((depth, name))
    return children


def _with_layout(scored: dict[str, dict], children: dict[str, list[str]], path: Path) -> dict[str, dict]:
    """Scored entries in table order, each with its depth; an unscored group's subtasks take its place."""
    nested = {c for kids in children.values() for c in kids}
    out: dict[str, dict] = {}

    def visit(name: str, depth: int) -> None:
        if name in out:
            return
        kids = children.get(name) or []
        if name in scored:
            out[name] = {**scored[name], "depth": depth, "group": any(k in scored or children.get(k) for k in kids)}
            depth += 1
        for kid in kids:
            visit(kid, depth)

    for name in [*scored, *children]:
        if name not in nested:
            visit(name, 0)
    return out


def _model_name(data: dict, fmt: str, path: Path) -> str:
    if fmt == "zagreus":
        return str(data.get("label") or Path(str(data.get("model") or path.stem)).name or path.stem)
    name = data.get("model_name")
    if not name:
        args = (data.get("config") or {}).get("model_args")
        if isinstance(args, dict):
            name = args.get("pretrained")
        elif isinstance(args, str):
            name = next((a.split("=", 1)[1] for a in args.split(",") if a.strip().startswith("pretrained=")), None)
    if name:
        return Path(str(name).rstrip("/")).name or str(name)
    return path.parent.name if path.name.startswith("results_") else path.stem


def labelled(result_files: list[Path]) -> list[dict]:
    """load_scores of each file, labels made unique (a repeated label gets its file's name)."""
    models, taken = [], set()
    for path in result_files:
        scores = load_scores(Path(path))
        if scores["label"] in taken:
            scores["label"] = f"{scores['label']} ({scores['path'].stem})"
        taken.add(scores["label"])
        models.append(scores)
    return models


def compare(result_files: list[Path], out_dir: Path) -> list[Path]:
    """compare.md, compare.csv and compare.png in out_dir from results files of either format."""
    if not result_files:
        raise UserError(f"no results given; pass {FORMATS}")
    models = labelled(result_files)
    metric_of: dict[str, str] = {}  # column -> the metric compared: the report's, else the first file's
    per_model: list[dict[str, dict]] = []
    for model in models:
        entries = {column(t): e for t, e in model["tasks"].items() if e["depth"] == 0}
        for name, entry in entries.items():
            metric_of.setdefault(name, report_metric(name) if report_metric(name) in entry["metrics"] else entry["metric"])
        per_model.append(entries)
    by_lang: dict[str, list[str]] = defaultdict(list)
    for name in metric_of:
        by_lang[task_language(name)].append(name)
    # English first as in the report, then the other languages alphabetically.
    languages = sorted(by_lang, key=lambda lang: (lang != "en", lang))
    headers = ["model"]
    for lang in languages:
        headers += [f"{t} ({metric_of[t]})" for t in by_lang[lang]] + [f"average_{lang}"]
    headers.append("average")
    rows = []
    for model, entries in zip(models, per_model):
        row: list = [model["label"]]
        lang_avgs = []
        for lang in languages:
            values = [entries[t]["metrics"].get(metric_of[t]) if t in entries else None for t in by_lang[lang]]
            lang_avgs.append(mean(values))
            row += values + [lang_avgs[-1]]
        row.append(mean(lang_avgs))
        rows.append(row)
    out_dir = Path(out_dir)
    files = write_tables(out_dir / "compare", headers, rows,
                         title="Benchmark comparison; averages per language and overall (mean of the language averages).")
    files.append(_bar_chart(out_dir / "compare.png", headers[1:], rows))
    return files


def _bar_chart(out: Path, columns: list[str], rows: list[list]) -> Path:
    import matplotlib  # only for the chart

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(columns))
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(columns)), 4.8))
    for i, row in enumerate(rows):
        values = [v if v is not None else 0.0 for v in row[1:]]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, values, width, label=row[0])
    return save_bar_chart(fig, ax, out, columns, "Benchmark comparison")


def save_bar_chart(fig, ax, out: Path, labels: list[str], title: str) -> Path:
    """Label, title and write a bar chart made with matplotlib (Agg), then free it."""
    import matplotlib.pyplot as plt  # only for the chart

    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
