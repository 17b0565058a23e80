"""One work unit read through the document filters: what both passes over the text share.

The signature pass (dedup.py) and the tokenize pass (pipeline.py) read a unit the same way, in
the same order; a document's `ordinal` is its place among the unit's documents (bad records
not counted), which is how the tokenize pass finds again the documents the signature pass saw.
Filters run in this order, the first that rejects a document takes the count: length, language,
quality.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from zagreus.data.filters import LanguageFilter, length_ok, quality_reason
from zagreus.data.plan import Plan
from zagreus.data.sources import DamagedFile, Skip, WorkUnit, read_unit
from zagreus.errors import UserError
from zagreus.recipe import Source

BAD_EXAMPLES = 5             # file:line cases shown in the warning


@dataclass
class UnitTally:
    """What reading a unit skipped and its filters removed, as the unit's summary records it."""

    read: list[int] = field(default_factory=lambda: [0, 0])          # docs, chars
    skipped: Counter = field(default_factory=Counter)
    removed: dict[str, list[int]] = field(default_factory=dict)     # filter -> [docs, chars]
    rules: Counter = field(default_factory=Counter)                  # quality rule -> docs
    bad: list[str] = field(default_factory=list)

    def skip(self, item: Skip) -> None:
        self.skipped[item.reason] += 1
        if len(self.bad) < BAD_EXAMPLES:
            self.bad.append(f"{item.where} ({item.reason})")

    def drop(self, name: str, text: str) -> None:
        entry = self.removed.setdefault(name, [0, 0])
        entry[0] += 1
        entry[1] += len(text)

    def summary(self) -> dict:
        return {"read": self.read, "skipped": dict(sorted(self.skipped.items())),
                "removed": dict(sorted(self.removed.items())), "quality_rules": dict(sorted(self.rules.items())),
                "bad": self.bad}

    @classmethod
    def from_summary(cls, summary: dict) -> "UnitTally":
        return cls(list(summary["read"]), Counter(summary["skipped"]),
                   {k: list(v) for k, v in summary["removed"].items()}, Counter(summary["quality_rules"]),
                   list(summary["bad"]))


def on_damaged_file(exc: DamagedFile, on_error: str) -> Skip:
    """The record of a damaged file left out under `on_error: skip`; under `fail`, the one-line error."""
    if on_error == "fail":
        raise UserError(f"{exc}, or leave such files out with data.on_error: skip "
                        "(--on-error skip in the quick form)") from None
    return Skip("damaged_file", f"{exc.path}:byte {exc.offset}")


def unit_docs(unit: WorkUnit, source: Source, tally: UnitTally) -> Iterator[tuple[int, str]]:
    """(ordinal, text) of every document of the unit; bad records go to `tally`."""
    ordinal = 0
    for item in read_unit(unit, source):
        if isinstance(item, Skip):
            tally.skip(item)
            continue
        yield ordinal, item.text
        ordinal += 1


class DocFilter:
    """The length, language and quality filters of a plan; one per process (holds the language models)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self._lang: dict[str, LanguageFilter | None] = {}

    def _language_filter(self, source: Source) -> LanguageFilter | None:
        if source.name not in self._lang:
            f = self.plan.data.filters
            allowed = [source.language] if source.language else f.languages
            use = f.languages is not None and not source.code and not source.stdlib
            self._lang[source.name] = LanguageFilter(allowed, f.language_threshold) if use and allowed else None
        return self._lang[source.name]

    def kept(self, unit: WorkUnit, tally: UnitTally) -> Iterator[tuple[int, str]]:
        """(ordinal, text) of the unit's documents that pass the filters; the rest go to `tally`."""
        source = self.plan.source(unit.source)
        f = self.plan.data.filters
        lang = self._language_filter(source)
        prose = not source.code and not source.stdlib
        for ordinal, text in unit_docs(unit, source, tally):
            tally.read[0] += 1
            tally.read[1] += len(text)
            if not length_ok(text, f.min_chars, f.max_chars):
                tally.drop("length", text)
            elif lang is not None and not lang.keep(text):
                tally.drop("language", text)
            elif prose and f.quality and (rule := quality_reason(text)) is not None:
                tally.drop("quality", text)
                tally.rules[rule] += 1
            else:
                yield ordinal, text
