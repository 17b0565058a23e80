"""Models side by side (the report's Table 7): model x task grouped by language, with the
average of each language and the overall average (the mean of the language averages, the
report's *Media_Totale*), as Markdown, CSV and a grouped bar chart."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from zagreus.errors import UserError
from zagreus.eval.registry import display_name, report_metric, task_language
from zagreus.eval.run import read_results
from zagreus.eval.tables import mean, write_tables


def _label(results: dict, path: Path, taken: set[str]) -> str:
    label = results.get("label") or Path(str(results.get("model") or path.stem)).name or path.stem
    if label in taken:
        label = f"{label} ({path.stem})"
    taken.add(label)
    return label


def compare(result_files: list[Path], out_dir: Path) -> list[Path]:
    """compare.md, compare.csv and compare.png in out_dir from `zagreus eval --out` files."""
    if not result_files:
        raise UserError("no results given; pass JSON files written by `zagreus eval --out`")
    models: list[tuple[str, dict[str, float | None]]] = []
    taken: set[str] = set()
    tasks: list[str] = []
    for path in result_files:
        results = read_results(Path(path))
        scores = {}
        for task, entry in results["tasks"].items():
            scores[task] = entry.get("metrics", {}).get(report_metric(task), entry.get("value"))
            if task not in tasks:
                tasks.append(task)
        models.append((_label(results, Path(path), taken), scores))
    by_lang: dict[str, list[str]] = defaultdict(list)
    for task in tasks:
        by_lang[task_language(task)].append(task)
    # English first as in the report, then the other languages alphabetically.
    languages = sorted(by_lang, key=lambda lang: (lang != "en", lang))
    headers = ["model"]
    for lang in languages:
        headers += [f"{display_name(t)} ({report_metric(t)})" for t in by_lang[lang]] + [f"average_{lang}"]
    headers.append("average")
    rows = []
    for label, scores in models:
        row: list = [label]
        lang_avgs = []
        for lang in languages:
            values = [scores.get(t) for t in by_lang[lang]]
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(columns))
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(columns)), 4.8))
    for i, row in enumerate(rows):
        values = [v if v is not None else 0.0 for v in row[1:]]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, values, width, label=row[0])
    ax.set_xticks(x, columns, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("score")
    ax.set_title("Benchmark comparison")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
