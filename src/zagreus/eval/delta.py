"""A base model against its fine-tune, task by task (the report's Table 9 and Figure 9).

One row per task with its metric, the two scores and Δ = fine-tune − base, then an average row;
Markdown, CSV and a bar chart. Either file may be `zagreus eval --out`'s or lm-eval's
(see `zagreus.eval.compare.load_scores`). A group lm-eval scored as a whole (evalita-mp,
the report's "Overall") is a row followed by its subtasks; the average is over the rows both
files score, group rows left out since their subtasks are counted already.
"""

from __future__ import annotations

from pathlib import Path

from zagreus.errors import UserError
from zagreus.eval.compare import column, labelled, save_bar_chart
from zagreus.eval.registry import report_metric
from zagreus.eval.tables import mean, write_tables

DELTA = "Δ (fine-tune − base)"


def _rows_of(model: dict) -> dict[str, dict]:
    """column name -> entry, for the tasks and scored groups of the first two levels."""
    return {column(t): e for t, e in model["tasks"].items() if e["depth"] <= 1}


def delta_rows(base_file: Path, finetune_file: Path) -> tuple[list[str], list[list]]:
    """(headers, rows) of the delta table; the last row is the average."""
    base, tuned = labelled([base_file, finetune_file])
    b, t = _rows_of(base), _rows_of(tuned)
    rows, counted = [], []
    for name in [*b, *(n for n in t if n not in b)]:
        first = b.get(name) or t[name]
        metric = report_metric(name) if report_metric(name) in first["metrics"] else first["metric"]
        scores = []
        for model, entries in ((base, b), (tuned, t)):
            entry = entries.get(name)
            if entry is not None and metric not in entry["metrics"]:
                raise UserError(f"{model['path']}: task {name} has no {metric} score (it has "
                                f"{', '.join(entry['metrics'])}); evaluate both models on the same task version")
            scores.append(entry["metrics"][metric] if entry is not None else None)
        d = scores[1] - scores[0] if None not in scores else None
        rows.append([name, metric, *scores, d])
        # A group shown above its subtasks (the first level) is not counted again in the average.
        above_subtasks = any(e["group"] and e["depth"] == 0 for e in (b.get(name), t.get(name)) if e is not None)
        if d is not None and not above_subtasks:
            counted.append(rows[-1])
    if not rows:
        raise UserError(f"{base_file}, {finetune_file}: no task scores to compare")
    metrics = {r[1] for r in counted}
    avg_base, avg_tuned = mean([r[2] for r in counted]), mean([r[3] for r in counted])
    avg_delta = avg_tuned - avg_base if counted else None
    rows.append(["average", metrics.pop() if len(metrics) == 1 else "mean", avg_base, avg_tuned, avg_delta])
    return ["task", "metric", base["label"], tuned["label"], DELTA], rows


def delta(base_file: Path, finetune_file: Path, out_dir: Path) -> list[Path]:
    """delta.md, delta.csv and delta.png in out_dir."""
    headers, rows = delta_rows(Path(base_file), Path(finetune_file))
    out_dir = Path(out_dir)
    files = write_tables(out_dir / "delta", headers, rows,
                         title=f"{headers[3]} against its base {headers[2]}, task by task; Δ = fine-tune − base. "
                               "The average is over the tasks both score (group rows not counted: their subtasks are).")
    files.append(_chart(out_dir / "delta.png", headers, rows))
    return files


def _chart(out: Path, headers: list[str], rows: list[list]) -> Path:
    import matplotlib  # only for the chart

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(rows)), 4.8))
    for i, label in enumerate(headers[2:4]):
        ax.bar(x + (i - 0.5) * 0.4, [r[2 + i] if r[2 + i] is not None else 0.0 for r in rows], 0.4, label=label)
    for xi, row in zip(x, rows):
        if row[4] is not None:
            top = max(v for v in row[2:4] if v is not None)
            ax.annotate(f"{row[4]:+.4f}", (xi, top), ha="center", va="bottom", fontsize=7,
                        xytext=(0, 2), textcoords="offset points")
    return save_bar_chart(fig, ax, out, [f"{r[0]} ({r[1]})" for r in rows], f"{headers[3]} vs {headers[2]} (Δ above each pair)")
