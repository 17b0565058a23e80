"""The plan of a tokenize run: its work units, its identity (hash) and the layout of its work folder.

The plan hash covers the data section (executor and on_error excluded), the tokenizer identity
and the inputs' sizes and mtimes, so a changed input never reuses stale work. Every phase reads
the plan from `.work/<hash>/plan.json` and writes only under paths this module names:

  .work/<hash>/plan.json
  .work/<hash>/sigs/NNNNN.*        dedup signatures of a unit (dedup.py), NNNNN.json last
  .work/<hash>/buckets/R-of-W.npy  duplicate pairs found by bucket task R of W (dedup.py)
  .work/<hash>/removed.*           the documents dedup removes, whole corpus (dedup.py)
  .work/<hash>/units/NNNNN.*       a tokenized unit's summary (pipeline.py), NNNNN.json last
  train|val/<source>/NNNNN-KKK.ds  the unit's final shards, written by the worker that tokenized it
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from zagreus.data.sources import WorkUnit, input_signature, pin_revision, plan_source
from zagreus.recipe import DataSection, Source

SPLITS = ("train", "val")
LAYOUT = 2  # of the work folder, in the plan hash: work left by another layout is never resumed


@dataclass
class Plan:
    """Everything a worker needs, as written to plan.json."""

    hash: str
    data_dir: Path
    tokenizer: str                  # spec for load_tokenizer ('llama3' or a path)
    data: DataSection
    units: list[WorkUnit]
    origins: dict[str, str] = field(default_factory=dict)

    @property
    def work_dir(self) -> Path:
        return self.data_dir / ".work" / self.hash

    @property
    def dedup(self) -> bool:
        return self.data.filters.dedup != "none"

    def _name(self, index: int) -> str:
        # as wide as the largest unit index needs (at least 5): names sort in plan order
        return f"{index:0{max(5, len(str(len(self.units) - 1)))}d}"

    def unit_path(self, unit: WorkUnit, suffix: str = "json") -> Path:
        """A tokenized unit's summary (`json`, its completion marker) or per-document table (`docs.npy`)."""
        return self.work_dir / "units" / f"{self._name(unit.index)}.{suffix}"

    def sig_path(self, index: int, suffix: str = "json") -> Path:
        return self.work_dir / "sigs" / f"{self._name(index)}.{suffix}"

    def shard_path(self, split: str, unit: WorkUnit, k: int) -> Path:
        return self.data_dir / split / unit.source / f"{self._name(unit.index)}-{k:03d}.ds"

    def source(self, name: str) -> Source:
        return next(s for s in self.data.sources if s.name == name)

    def budgets(self) -> dict[str, int | None]:
        total = sum(s.weight for s in self.data.sources)
        if self.data.tokens is None:
            return {s.name: None for s in self.data.sources}
        return {s.name: int(self.data.tokens * s.weight / total) for s in self.data.sources}

    def to_json(self) -> dict:
        return {"hash": self.hash, "tokenizer": self.tokenizer, "data": self.data.model_dump(mode="json"),
                "units": [u.to_json() for u in self.units], "origins": self.origins}

    @classmethod
    def from_json(cls, raw: dict, data_dir: Path) -> "Plan":
        return cls(raw["hash"], Path(data_dir), raw["tokenizer"], DataSection(**raw["data"]),
                   [WorkUnit.from_json(u) for u in raw["units"]], raw["origins"])

    @classmethod
    def load(cls, data_dir: Path, plan_hash: str) -> "Plan":
        return cls.from_json(json.loads((Path(data_dir) / ".work" / plan_hash / "plan.json").read_text()), data_dir)

    def save(self) -> None:
        for sub in ("units", "sigs", "buckets"):
            self.work_dir.joinpath(sub).mkdir(parents=True, exist_ok=True)
        if not (self.work_dir / "plan.json").is_file():
            atomic_write(self.work_dir / "plan.json", json.dumps(self.to_json(), indent=1).encode())


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_save(path: Path, array: np.ndarray) -> None:
    """np.save under `path` through a rename: a reader sees the whole array or none."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def plan_units(data: DataSection, resolve: Callable[[str], Path] = Path) -> tuple[DataSection, list[WorkUnit], dict[str, str]]:
    """(the data section with every hub source pinned to a commit, its work units, each source's origin)."""
    units: list[WorkUnit] = []
    origins = {}
    pinned = [pin_revision(s) for s in data.sources]
    for s in pinned:
        units += plan_source(s, len(units), data.unit_bytes, resolve)
        origins[s.name] = s.hub or ("python stdlib" if s.stdlib else ", ".join(s.paths()))
    return data.model_copy(update={"sources": pinned}), units, origins


def make_plan(data: DataSection, data_dir: Path, tokenizer_spec: str, identity: dict,
              units: list[WorkUnit], origins: dict[str, str]) -> Plan:
    # on_error changes no unit's output (a damaged unit is either skipped or never written), so a
    # run stopped on a damaged file resumes with on_error: skip, and plans of earlier versions stay valid.
    key = {"layout": LAYOUT, "data": data.model_dump(mode="json", exclude={"executor", "on_error"}), "tokenizer": identity,
           "units": [u.to_json() for u in units], "inputs": input_signature(units)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Plan(digest, Path(data_dir), tokenizer_spec, data, units, origins)
