"""Score tables as Markdown and CSV (the report's layout: 4 decimals, an em dash when missing)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

Cell = str | float | int | None


def mean(values: Sequence[float | None]) -> float | None:
    """Mean of the present values, as the report averages partially evaluated rows."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _md(cell: Cell) -> str:
    if cell is None:
        return "—"
    if isinstance(cell, float):
        return f"{cell:.4f}"
    return str(cell)


def markdown(headers: Sequence[str], rows: Sequence[Sequence[Cell]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("-" * (len(h) + 2) for h in headers) + "|"]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_tables(stem: Path, headers: Sequence[str], rows: Sequence[Sequence[Cell]], title: str = "") -> list[Path]:
    """stem.md and stem.csv; the CSV keeps full precision and leaves missing cells empty."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    md = stem.with_suffix(".md")
    md.write_text((f"{title}\n\n" if title else "") + markdown(headers, rows), encoding="utf-8")
    out_csv = stem.with_suffix(".csv")
    with open(out_csv, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(headers)
        writer.writerows([["" if c is None else c for c in row] for row in rows])
    return [md, out_csv]
