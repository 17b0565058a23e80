"""The tokenize stage: plan work units, process them in parallel, merge into shards + manifest.

Three phases, each restartable:

1. plan (one process): resolve the tokenizer (training the BPE first when the recipe asks for
   one), split every source into deterministic work units (`sources.plan_source`), write
   `.work/<plan hash>/plan.json`. The hash covers the data section (executor and on_error excluded), the
   tokenizer identity and the inputs' sizes and mtimes, so a changed input never reuses stale work.
2. units (any number of processes, any executor): read -> filter (length, language, quality) ->
   tokenize -> dedup keys, written per unit to `units/NNNNN.npz` through an atomic rename; the
   file's presence is the completion marker, so a killed run redoes only unfinished units.
3. finalize (one process): walk the units in plan order, apply exact and MinHash dedup, the
   per-source token budget and the validation split, write the shards, then manifest.json
   last (atomically). It rewrites every shard from the unit files, so its output depends only
   on the plan: byte-identical whatever the number of workers and however often it was killed.

BOS/EOS policy: every document is written as [BOS] + ids (+ [EOS]) with recipe `add_bos`
(default true, Llama-3's `<|begin_of_text|>` before each document) and `add_eos` (default
false): the next document's BOS already marks the boundary. Special-token strings inside
documents are encoded as plain text. The token budget counts these BOS/EOS tokens.

Budget: source i gets `tokens * weight_i / sum(weights)` tokens (train + val), filled with
documents in plan order; the document that crosses the budget is still taken whole.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from zagreus.data import shards
from zagreus.data.filters import LanguageFilter, MinHasher, NearDupIndex, is_validation, length_ok, quality_reason, text_digest
from zagreus.data.sources import (
    DamagedFile, Doc, Skip, WorkUnit, input_signature, pin_revision, plan_source, read_unit,
)
from zagreus.errors import UserError
from zagreus.recipe import DataSection, FiltersSection, Source
from zagreus.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
BATCH_CHARS = 8 << 20        # characters per tokenizer batch: large batches keep tiktoken's threads busy
BAD_EXAMPLES = 5             # file:line cases shown in the warning
BUDGET_MARGIN = 1.25         # workers skip units once earlier ones hold this much of the budget
PR_SET_PDEATHSIG = 1         # prctl option (linux/prctl.h): a signal for this process when its parent dies
REMOVALS = ("length", "language", "quality", "exact_dedup", "minhash_dedup", "budget")  # manifest order


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

    def unit_path(self, unit: WorkUnit) -> Path:
        return self.work_dir / "units" / f"{unit.index:05d}.npz"

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
        self.work_dir.joinpath("units").mkdir(parents=True, exist_ok=True)
        if not (self.work_dir / "plan.json").is_file():
            _atomic_write(self.work_dir / "plan.json", json.dumps(self.to_json(), indent=1).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --- phase 1: plan --------------------------------------------------------------------------
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
    key = {"data": data.model_dump(mode="json", exclude={"executor", "on_error"}), "tokenizer": identity,
           "units": [u.to_json() for u in units], "inputs": input_signature(units)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Plan(digest, Path(data_dir), tokenizer_spec, data, units, origins)


# --- phase 2: work units --------------------------------------------------------------------
def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class UnitProcessor:
    """Reads, filters and tokenizes work units; one per process (holds the tokenizer and filters).

    `threads` is this process's share of the cores: with one core each (as many workers as
    cores) documents are encoded one by one, since the tokenizers' own thread pools would only
    oversubscribe the cores (measured: ~20% more CPU time for the same tokens); with more, the
    tokenizer's multi-threaded batch encoding is used.
    """

    def __init__(self, plan: Plan, threads: int | None = None):
        self.plan = plan
        self.threads = threads or available_cores()
        self.tok = load_tokenizer(plan.tokenizer)
        self.dtype = shards.token_dtype(self.tok.vocab_size)
        f = plan.data.filters
        self.minhash = MinHasher(f.minhash.num_perm, f.minhash.ngram) if f.dedup == "minhash" else None
        self._lang: dict[str, LanguageFilter | None] = {}

    def _language_filter(self, source: Source) -> LanguageFilter | None:
        if source.name not in self._lang:
            f = self.plan.data.filters
            allowed = [source.language] if source.language else f.languages
            use = f.languages is not None and not source.code and not source.stdlib
            self._lang[source.name] = LanguageFilter(allowed, f.language_threshold) if use and allowed else None
        return self._lang[source.name]

    def done(self, unit: WorkUnit) -> bool:
        return self.plan.unit_path(unit).is_file()

    def over_budget(self, unit: WorkUnit) -> bool:
        """True when finished earlier units of the source already fill its token budget or
        `max_documents`, with a margin for what dedup may still remove.

        Only an optimisation: finalize processes any unit it turns out to need, so skipping
        here never changes the output.
        """
        budget = self.plan.budgets()[unit.source]
        max_docs = self.plan.source(unit.source).max_documents
        if budget is None and max_docs is None:
            return False
        tokens = docs = 0
        for u in self.plan.units:
            if u.index >= unit.index:
                break
            if u.source == unit.source and self.done(u):
                summary = json.loads(self.plan.unit_path(u).with_suffix(".json").read_text())
                tokens += summary["tokens"]
                docs += summary["docs"]
        return ((budget is not None and tokens >= budget * BUDGET_MARGIN)
                or (max_docs is not None and docs >= max_docs * BUDGET_MARGIN))

    def _kept_texts(self, unit: WorkUnit, source: Source, tally: _UnitTally) -> Iterator[str]:
        """The unit's documents that pass the length, language and quality filters; the rest go to `tally`."""
        f = self.plan.data.filters
        lang = self._language_filter(source)
        prose = not source.code and not source.stdlib
        for item in read_unit(unit, source):
            if isinstance(item, Skip):
                tally.skip(item)
                continue
            text = item.text
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
                yield text

    def process(self, unit: WorkUnit, progress: Callable[[int, int, int], None] | None = None) -> None:
        source = self.plan.source(unit.source)
        tally = _UnitTally()
        columns = _UnitColumns(self)
        reported = 0
        try:
            for batch in _batches(self._kept_texts(unit, source, tally)):
                encoded = self.tok.encode_batch(batch) if self.threads > 1 else [self.tok.encode(t) for t in batch]
                batch_tokens = sum(columns.add(text, ids) for text, ids in zip(batch, encoded))
                if progress:  # characters stand in for bytes until the unit ends (see below)
                    step = min(sum(map(len, batch)), max(0, unit.size - reported))
                    progress(len(batch), batch_tokens, step)
                    reported += step
        except DamagedFile as exc:
            # What was read of the file goes with it: never a part of a file passed off as the whole.
            tally, columns = _UnitTally(), _UnitColumns(self)
            tally.skip(on_damaged_file(exc, self.plan.data.on_error))
        if progress and unit.size > reported:
            progress(0, 0, unit.size - reported)  # the unit's bytes are all read now
        columns.save(self.plan.unit_path(unit), {"unit": unit.index, **tally.summary()})

    def run_ranks(self, rank: int, world: int) -> None:
        """Round-robin share of a datatrove task: units rank, rank + world, ..."""
        for unit in self.plan.units[rank::world]:
            if not self.done(unit) and not self.over_budget(unit):
                self.process(unit)


def on_damaged_file(exc: DamagedFile, on_error: str) -> Skip:
    """The record of a damaged file left out under `on_error: skip`; under `fail`, the one-line error."""
    if on_error == "fail":
        raise UserError(f"{exc}, or leave such files out with data.on_error: skip "
                        "(--on-error skip in the quick form)") from None
    return Skip("damaged_file", f"{exc.path}:byte {exc.offset}")


def _batches(texts: Iterable[str]) -> Iterator[list[str]]:
    """`texts` in tokenizer batches of at least BATCH_CHARS characters (the last one may be shorter)."""
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


@dataclass
class _UnitTally:
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


class _UnitColumns:
    """A unit's kept documents, column by column as its .npz stores them."""

    def __init__(self, processor: UnitProcessor):
        data = processor.plan.data
        self.dtype, self.minhash = processor.dtype, processor.minhash
        self.bos = [processor.tok.bos_id] if data.add_bos else []
        self.eos = [processor.tok.eos_id] if data.add_eos else []
        self.validation_fraction = data.validation_fraction
        # neither dedup nor a validation split: skip normalising and hashing
        self.digest = data.filters.dedup != "none" or data.validation_fraction > 0
        self.tokens: list[np.ndarray] = []
        self.lengths: list[int] = []
        self.chars: list[int] = []
        self.keys: list[int] = []
        self.val: list[bool] = []
        self.sigs: list[np.ndarray] = []

    def add(self, text: str, ids: list[int]) -> int:
        """Appends one document; returns its token count (BOS/EOS included)."""
        arr = np.asarray(self.bos + ids + self.eos, dtype=self.dtype)
        self.tokens.append(arr)
        self.lengths.append(len(arr))
        self.chars.append(len(text))
        if self.digest:
            dkey, skey = text_digest(text)
            self.keys.append(dkey)
            self.val.append(is_validation(skey, self.validation_fraction))
        else:
            self.keys.append(0)
            self.val.append(False)
        if self.minhash is not None:
            self.sigs.append(self.minhash.signature(np.asarray(ids, dtype=np.uint64)))
        return len(arr)

    def save(self, path: Path, summary: dict) -> None:
        """Writes the summary (with docs and tokens), then the .npz, whose rename marks the unit done."""
        ends = np.cumsum(np.asarray(self.lengths, dtype=np.uint64)) if self.lengths else np.zeros(0, np.uint64)
        summary = {**summary, "docs": len(self.lengths), "tokens": int(ends[-1]) if len(ends) else 0}
        _atomic_write(path.with_suffix(".json"), json.dumps(summary).encode())
        tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npz")
        np.savez(tmp, tokens=np.concatenate(self.tokens) if self.tokens else np.zeros(0, self.dtype), ends=ends,
                 chars=np.asarray(self.chars, dtype=np.uint64), keys=np.asarray(self.keys, dtype=np.uint64),
                 val=np.asarray(self.val, dtype=bool),
                 sigs=np.stack(self.sigs) if self.sigs else np.zeros((0, 0), np.uint32))
        os.replace(tmp, path)


# --- phase 3: finalize ----------------------------------------------------------------------
class _SplitWriter:
    """The rolling shards of one (split, source) folder."""

    def __init__(self, folder: Path, rel: str, tok_name: str, vocab_size: int, shard_tokens: int):
        self.folder, self.rel = folder, rel
        self.tok_name, self.vocab_size, self.shard_tokens = tok_name, vocab_size, shard_tokens
        self.writer: shards.ShardWriter | None = None
        self.shards: list[dict] = []
        self.docs = self.chars = self.tokens = 0

    def write(self, ids: np.ndarray, chars: int) -> None:
        if self.writer is not None and self.writer.tokens and self.writer.tokens + len(ids) > self.shard_tokens:
            self.close()
        if self.writer is None:
            name = f"{len(self.shards):05d}.ds"
            self.writer = shards.ShardWriter(self.folder / name, self.tok_name, self.vocab_size)
            self.shards.append({"file": f"{self.rel}/{name}", "docs": 0, "chars": 0, "tokens": 0})
        self.writer.write(ids)
        s = self.shards[-1]
        s["docs"] += 1
        s["chars"] += chars
        s["tokens"] += len(ids)
        self.docs += 1
        self.chars += chars
        self.tokens += len(ids)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def summary(self) -> dict:
        return {"docs": self.docs, "chars": self.chars, "tokens": self.tokens, "shards": self.shards}


def _add(counter: dict, name: str, docs: int, chars: int) -> None:
    entry = counter.setdefault(name, {"docs": 0, "chars": 0})
    entry["docs"] += docs
    entry["chars"] += chars


class _Dedup:
    """The documents finalize has taken so far, across sources: exact keys and MinHash signatures."""

    def __init__(self, filters: FiltersSection):
        self.exact: set[int] | None = set() if filters.dedup != "none" else None
        m = filters.minhash
        self.near = NearDupIndex(m.num_perm, m.bands, m.threshold) if filters.dedup == "minhash" else None

    def rule(self, key: int, sigs: np.ndarray, i: int) -> str | None:
        """The rule by which document `i` (dedup key `key`, MinHash row `sigs[i]`) is a duplicate, or
        None; a document that is not is remembered. `sigs` is empty without MinHash dedup."""
        if self.exact is not None:
            if key in self.exact:
                return "exact_dedup"
            self.exact.add(key)
        if self.near is not None and self.near.check_add(sigs[i]):
            return "minhash_dedup"
        return None


class _UnitFiles:
    """The plan's unit files, processing here a unit that a worker skipped as past the budget
    but that is needed after dedup."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.processor: UnitProcessor | None = None

    def load(self, unit: WorkUnit) -> tuple[dict, dict[str, np.ndarray]]:
        """The unit's summary and arrays."""
        path = self.plan.unit_path(unit)
        if not path.is_file():
            self.processor = self.processor or UnitProcessor(self.plan)
            self.processor.process(unit)
        summary = json.loads(path.with_suffix(".json").read_text())
        with np.load(path) as z:
            return summary, {k: z[k] for k in ("tokens", "ends", "chars", "keys", "val", "sigs")}


def _finalize_source(plan: Plan, source: Source, tok: Tokenizer, dedup: _Dedup,
                     files: _UnitFiles) -> tuple[dict, Counter, list[str]]:
    """Writes one source's shards from its units in plan order, until its budget or max_documents is
    met; returns its manifest entry, its skipped-record counts and its bad-record examples."""
    data = plan.data
    units = [u for u in plan.units if u.source == source.name]
    writers = {split: _SplitWriter(plan.data_dir / split / source.name, f"{split}/{source.name}", tok.name,
                                   tok.vocab_size, data.shard_tokens) for split in ("train", "val")}
    budget = plan.budgets()[source.name]
    skipped: Counter = Counter()
    removed: dict[str, dict] = {}
    rules: Counter = Counter()
    bad: list[str] = []
    read = [0, 0]
    taken_tokens = taken_docs = used = 0

    def full() -> bool:
        return (budget is not None and taken_tokens >= budget) or (
            source.max_documents is not None and taken_docs >= source.max_documents)

    for unit in units:
        if full():
            break
        used += 1
        summary, z = files.load(unit)
        read[0] += summary["read"][0]
        read[1] += summary["read"][1]
        skipped.update(summary["skipped"])
        rules.update(summary["quality_rules"])
        for name, (d, c) in summary["removed"].items():
            _add(removed, name, d, c)
        bad += summary["bad"]
        ends = z["ends"]
        starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        for i in range(len(ends)):
            n_chars = int(z["chars"][i])
            rule = "budget" if full() else dedup.rule(int(z["keys"][i]), z["sigs"], i)
            if rule is not None:
                _add(removed, rule, 1, n_chars)
                continue
            ids = z["tokens"][starts[i]:int(ends[i])]
            writers["val" if z["val"][i] else "train"].write(ids, n_chars)
            taken_tokens += len(ids)
            taken_docs += 1
    for w in writers.values():
        w.close()
    filters = {k: removed[k] for k in REMOVALS if k in removed}
    if "quality" in filters:
        filters["quality"]["rules"] = dict(sorted(rules.items()))
    entry = {
        "origin": plan.origins[source.name],
        "revision": source.revision,  # the hub commit every unit read (pinned at plan time); None for local data
        "weight": source.weight / sum(s.weight for s in data.sources),
        "budget_tokens": budget,
        "units": {"total": len(units), "used": used},
        "read": {"docs": read[0], "chars": read[1]},
        "skipped": dict(sorted(skipped.items())),
        "filters": filters,
        "train": writers["train"].summary(),
        "val": writers["val"].summary(),
    }
    return entry, skipped, bad


def _write_manifest(plan: Plan, tok: Tokenizer, sources: dict[str, dict], skipped: Counter, bad: list[str],
                    phases: dict) -> dict:
    """Writes the tokenizer identity, then manifest.json (atomically, last: it marks the folder done)."""
    data = plan.data
    identity = tok.identity()
    shards.write_identity(plan.data_dir, identity)
    totals = {split: {k: sum(s[split][k] for s in sources.values()) for k in ("docs", "chars", "tokens")}
              for split in ("train", "val")}
    manifest = {
        "format": "datatrove",
        "plan": plan.hash,
        "tokenizer": {**identity, "hash": identity["fingerprint"]},
        "token_dtype": shards.token_dtype(tok.vocab_size).name,
        "policy": {"add_bos": data.add_bos, "add_eos": data.add_eos, "validation_fraction": data.validation_fraction,
                   "shard_tokens": data.shard_tokens, "tokens": data.tokens},
        "filters": data.filters.model_dump(mode="json"),
        "totals": {**totals, "skipped": dict(sorted(skipped.items()))},
        "skipped_examples": bad[:BAD_EXAMPLES],
        "sources": sources,
        "phases": phases,  # where this run's time went: wall_s, cpu_s (all processes) and tasks per phase
    }
    _atomic_write(plan.data_dir / MANIFEST, (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode())
    return manifest


class PhaseClock:
    """Wall and CPU seconds between laps; CPU counts this process and its ended children (the local
    pool's and datatrove's workers), so a phase's cpu_s over its wall_s shows how parallel it ran."""

    def __init__(self) -> None:
        self._wall, self._cpu = time.perf_counter(), self._cpu_now()

    @staticmethod
    def _cpu_now() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    def lap(self, tasks: int) -> dict:
        wall, cpu = time.perf_counter(), self._cpu_now()
        out = {"wall_s": round(wall - self._wall, 3), "cpu_s": round(cpu - self._cpu, 3), "tasks": tasks}
        self._wall, self._cpu = wall, cpu
        return out


def finalize(plan: Plan, phases: dict | None = None, clock: PhaseClock | None = None) -> dict:
    """Dedup, budget, split and write shards + manifest from the unit files (processing missing units).

    The manifest's `phases` holds `phases` (the earlier ones, timed by the caller) and this one's;
    a finalize run alone (a Slurm job) records only itself."""
    clock = clock or PhaseClock()
    tok = load_tokenizer(plan.tokenizer)
    for split in ("train", "val"):  # a killed finalize may have left shards; they are rewritten
        shutil.rmtree(plan.data_dir / split, ignore_errors=True)
    dedup, files = _Dedup(plan.data.filters), _UnitFiles(plan)
    sources: dict[str, dict] = {}
    skipped: Counter = Counter()
    bad: list[str] = []
    for source in plan.data.sources:  # in order: dedup keeps a document's first occurrence
        sources[source.name], source_skipped, source_bad = _finalize_source(plan, source, tok, dedup, files)
        skipped.update(source_skipped)
        bad += source_bad
    phases = {**(phases or {}), "finalize": clock.lap(tasks=1)}
    manifest = _write_manifest(plan, tok, sources, skipped, bad, phases)
    if skipped:
        log.warning("skipped %d bad record(s) (%s); first: %s", sum(skipped.values()),
                    ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())), "; ".join(bad[:BAD_EXAMPLES]))
    shutil.rmtree(plan.data_dir / ".work", ignore_errors=True)
    return manifest


# --- local parallel run ---------------------------------------------------------------------
_worker: UnitProcessor | None = None
_queue = None


def _die_with_parent(parent: int) -> None:
    """Has the kernel kill this worker when its parent dies: a SIGKILLed parent runs no cleanup, and
    its workers would otherwise wait on the pool's queue forever."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _init_worker(plan_json: dict, data_dir: str, queue, threads: int, parent: int) -> None:
    global _worker, _queue
    _die_with_parent(parent)
    _worker = UnitProcessor(Plan.from_json(plan_json, Path(data_dir)), threads=threads)
    _queue = queue


def _run_unit(index: int) -> int:
    unit = _worker.plan.units[index]
    if not _worker.over_budget(unit):
        _worker.process(unit, lambda d, t, c: _queue.put((d, t, c)))
    return index


class _Progress:
    """tqdm over input bytes, with documents/s and tokens/s in the postfix."""

    def __init__(self, total_bytes: int, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, mininterval=0.5)
        self.docs = self.tokens = 0
        self.t0 = time.perf_counter()

    def update(self, docs: int, tokens: int, nbytes: int) -> None:
        self.docs += docs
        self.tokens += tokens
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{self.docs / dt:,.0f} docs/s, {self.tokens / dt / 1e6:.2f}M tokens/s", refresh=False)
        self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()


def run_local(plan: Plan, workers: int, show_progress: bool = True) -> None:
    """Process the plan's missing units on a pool of `workers` processes (dynamic assignment)."""
    import multiprocessing as mp
    import queue as queue_mod
    from concurrent.futures import ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    todo = [u for u in plan.units if not plan.unit_path(u).is_file()]
    if not todo:
        return
    bar = _Progress(sum(u.size for u in todo), "tokenize") if show_progress else None
    update = bar.update if bar else (lambda d, t, c: None)
    try:
        if workers <= 1:
            proc = UnitProcessor(plan)
            for unit in todo:
                if not proc.over_budget(unit):
                    proc.process(unit, update)
            return
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        threads = max(1, available_cores() // workers)

        def drain() -> None:
            while True:
                try:
                    update(*queue.get_nowait())
                except queue_mod.Empty:
                    return

        # ProcessPoolExecutor, not Pool: a worker killed by the OS (e.g. out of memory) raises
        # BrokenProcessPool here instead of hanging the run.
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(plan.to_json(), str(plan.data_dir), queue, threads, os.getpid())) as pool:
            pending = {pool.submit(_run_unit, u.index) for u in todo}
            try:
                while pending:
                    done, pending = wait(pending, timeout=0.2)
                    drain()
                    for future in done:
                        try:
                            future.result()  # re-raise a worker's exception here
                        except BrokenProcessPool:
                            raise UserError(f"a worker process died (killed by the system, e.g. out of memory?); "
                                            f"{plan.data_dir}: finished work units are kept, run the same command "
                                            "again to resume (or lower the workers)") from None
            except BaseException:
                # Leaving the block waits for the pool: only the units in flight finish, not the queued ones.
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        drain()
    finally:
        if bar:
            bar.close()


def iter_unit_texts(data: DataSection, units: list[WorkUnit], max_chars: int) -> Iterator[str]:
    """Raw documents of the sources in plan order, each source capped at its weight's share of `max_chars`."""
    total_w = sum(s.weight for s in data.sources)
    for source in data.sources:
        cap, seen = max_chars * source.weight / total_w, 0
        for unit in (u for u in units if u.source == source.name):
            texts: list[str] = []  # given out once the unit is read: a damaged file's part stays out
            try:
                for item in read_unit(unit, source):
                    if isinstance(item, Doc):
                        seen += len(item.text)
                        texts.append(item.text)
                        if seen >= cap:
                            break
            except DamagedFile as exc:
                on_damaged_file(exc, data.on_error)
                seen -= sum(map(len, texts))
                texts = []
            yield from texts
            if seen >= cap:
                break
