"""The tokenize stage's work: [dedup] -> tokenize units -> finalize, each phase restartable.

1. plan (one process, plan.py): the work units and the plan hash.
2. dedup (dedup.py, only when `filters.dedup` is not none): signatures, buckets, clusters; the
   list of documents to remove, whole corpus, before any token is written.
3. units (any number of processes, any executor): read -> filter (length, language, quality; or,
   after dedup, the documents the signature pass kept minus the removed ones) -> tokenize ->
   the unit's final datatrove shards, `train|val/<source>/NNNNN-KKK.ds` (rolled over at
   `shard_tokens`), then its summary `units/NNNNN.json` through an atomic rename: the summary's
   presence marks the unit done, so a killed run redoes only unfinished units and rewrites their
   shards under the same names.
4. finalize (one process, metadata only): walks the units' summaries in plan order, applies the
   per-source token budget (cutting the shards of the unit that crosses it in place, deleting
   those of units past it), deletes whatever a killed worker left, writes manifest.json last
   (atomically). No token is read or written again; the output depends only on the plan:
   byte-identical whatever the number of tasks and however often it was killed.

BOS/EOS policy: every document is written as [BOS] + ids (+ [EOS]) with recipe `add_bos`
(default true, Llama-3's `<|begin_of_text|>` before each document) and `add_eos` (default
false): the next document's BOS already marks the boundary. Special-token strings inside
documents are encoded as plain text. The token budget counts these BOS/EOS tokens.

Budget: source i gets `tokens * weight_i / sum(weights)` tokens (train + val), filled with
documents in plan order; the document that crosses the budget is still taken whole. Dedup runs
over the whole corpus first, so a document can be removed as a copy of one that the budget of
an earlier source then leaves out.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import resource
import shutil
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from zagreus.data import dedup, shards
from zagreus.data.filters import is_validation, text_digest
from zagreus.data.plan import SPLITS, Plan, atomic_save, atomic_write
from zagreus.data.sources import DamagedFile, Doc, WorkUnit, read_unit
from zagreus.data.units import BAD_EXAMPLES, DocFilter, UnitTally, on_damaged_file, unit_docs
from zagreus.errors import UserError
from zagreus.recipe import DataSection, Source
from zagreus.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
BATCH_CHARS = 8 << 20        # characters per tokenizer batch: large batches keep tiktoken's threads busy
BUDGET_MARGIN = 1.25         # workers skip units once earlier ones hold this much of the budget
PR_SET_PDEATHSIG = 1         # prctl option (linux/prctl.h): a signal for this process when its parent dies
REMOVALS = ("length", "language", "quality", "exact_dedup", "minhash_dedup", "budget")  # manifest order


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class _UnitShards:
    """The rolling final shards of one unit in one split."""

    def __init__(self, plan: Plan, unit: WorkUnit, split: str, tok: Tokenizer):
        self.plan, self.unit, self.split, self.tok = plan, unit, split, tok
        self.writer: shards.ShardWriter | None = None
        self.files: list[dict] = []

    def write(self, ids: np.ndarray, chars: int) -> None:
        if self.writer is not None and self.writer.tokens and self.writer.tokens + len(ids) > self.plan.data.shard_tokens:
            self.close()
        if self.writer is None:
            path = self.plan.shard_path(self.split, self.unit, len(self.files))
            self.writer = shards.ShardWriter(path, self.tok.name, self.tok.vocab_size)
            self.files.append({"file": str(path.relative_to(self.plan.data_dir)), "docs": 0, "chars": 0, "tokens": 0})
        self.writer.write(ids)
        f = self.files[-1]
        f["docs"] += 1
        f["chars"] += chars
        f["tokens"] += len(ids)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def abort(self) -> None:
        """Removes every file of the unit in this split (a damaged input is left out whole)."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        for f in self.files:
            shards.keep_documents(self.plan.data_dir / f["file"], 0)
        self.files = []


class _EarlierUnits:
    """Tokens and documents of a source's finished units before a unit, kept up to date as the
    unit asked about moves forward."""

    def __init__(self) -> None:
        self.tokens = self.docs = 0
        self.over = False
        self.next = 0  # plan.units[:next] have been looked at
        self.pending: list[WorkUnit] = []  # looked at, of the source, not finished then

    def add_until(self, processor: "UnitProcessor", unit: WorkUnit) -> None:
        units = processor.plan.units
        while self.next < len(units) and units[self.next].index < unit.index:
            if units[self.next].source == unit.source:
                self.pending.append(units[self.next])
            self.next += 1
        still = []
        for u in self.pending:
            if processor.done(u):
                summary = json.loads(processor.plan.unit_path(u).read_text())
                self.tokens += summary["tokens"]
                self.docs += summary["docs"]
            else:
                still.append(u)
        self.pending = still


class UnitProcessor:
    """Tokenizes work units into their final shards; one per process (holds the tokenizer and filters).

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
        self.filter = DocFilter(plan)
        self._dedup: dedup.UnitDedup | None = None
        self._budget_tallies: dict[str, _EarlierUnits] = {}

    def done(self, unit: WorkUnit) -> bool:
        return self.plan.unit_path(unit).is_file()

    def over_budget(self, unit: WorkUnit) -> bool:
        """True when finished earlier units of the source already fill its token budget or
        `max_documents`, with a margin.

        Only an optimisation: finalize processes any unit it turns out to need, so skipping
        here never changes the output. A process asks about its units in increasing order, so the
        finished earlier units are added up as they appear: each summary is read once, and only the
        earlier units not finished at the last call (those other tasks are on) are looked at again.
        """
        budget = self.plan.budgets()[unit.source]
        max_docs = self.plan.source(unit.source).max_documents
        if budget is None and max_docs is None:
            return False
        tally = self._budget_tallies.setdefault(unit.source, _EarlierUnits())
        if not tally.over:  # totals only grow: once over, every later unit is
            tally.add_until(self, unit)
            tally.over = ((budget is not None and tally.tokens >= budget * BUDGET_MARGIN)
                          or (max_docs is not None and tally.docs >= max_docs * BUDGET_MARGIN))
        return tally.over

    def _documents(self, unit: WorkUnit) -> tuple[UnitTally, Iterator[str]]:
        """The unit's tally so far and its documents to tokenize."""
        if not self.plan.dedup:
            tally = UnitTally()
            return tally, (text for _, text in self.filter.kept(unit, tally))
        self._dedup = self._dedup or dedup.UnitDedup(self.plan)
        summary, fate = self._dedup.unit(unit)
        tally = UnitTally.from_summary(summary)  # the signature pass read the unit through the filters

        def kept() -> Iterator[str]:
            if not fate:
                return  # nothing passed the filters (or the file is damaged): no need to read it again
            for ordinal, text in unit_docs(unit, self.plan.source(unit.source), UnitTally()):
                if ordinal in fate:
                    if fate[ordinal] is None:
                        yield text
                    else:
                        tally.drop(fate[ordinal], text)

        return tally, kept()

    def process(self, unit: WorkUnit, progress: Callable[[int, int, int], None] | None = None) -> None:
        data = self.plan.data
        bos = [self.tok.bos_id] if data.add_bos else []
        eos = [self.tok.eos_id] if data.add_eos else []
        out = {split: _UnitShards(self.plan, unit, split, self.tok) for split in SPLITS}
        table: list[tuple[int, int, int]] = []  # per document: tokens, chars, in val
        tally, texts = self._documents(unit)
        reported = 0
        try:
            for batch in _batches(texts):
                encoded = self.tok.encode_batch(batch) if self.threads > 1 else [self.tok.encode(t) for t in batch]
                batch_tokens = 0
                for text, ids in zip(batch, encoded):
                    arr = np.asarray(bos + ids + eos, dtype=self.dtype)
                    val = data.validation_fraction > 0 and is_validation(text_digest(text)[1], data.validation_fraction)
                    out["val" if val else "train"].write(arr, len(text))
                    table.append((len(arr), len(text), val))
                    batch_tokens += len(arr)
                if progress:  # characters stand in for bytes until the unit ends (see below)
                    step = min(sum(map(len, batch)), max(0, unit.size - reported))
                    progress(len(batch), batch_tokens, step)
                    reported += step
        except DamagedFile as exc:
            # What was read of the file goes with it: never a part of a file passed off as the whole.
            for w in out.values():
                w.abort()
            tally, table = UnitTally(), []
            tally.skip(on_damaged_file(exc, data.on_error))
        for w in out.values():
            w.close()
        if progress and unit.size > reported:
            progress(0, 0, unit.size - reported)  # the unit's bytes are all read now
        docs = np.asarray(table, dtype=np.uint64).reshape(-1, 3)
        atomic_save(self.plan.unit_path(unit, "docs.npy"), docs)
        summary = {"unit": unit.index, **tally.summary(), "docs": len(docs), "tokens": int(docs[:, 0].sum()),
                   "chars": int(docs[:, 1].sum()), "files": {split: out[split].files for split in SPLITS}}
        atomic_write(self.plan.unit_path(unit), json.dumps(summary).encode())

    def expect(self, units: Iterable[WorkUnit]) -> None:
        """This process will tokenize about `units` (the tokenizer picks its engine from how much).
        Units of sources with a token budget or max_documents do not count: how much of them is
        read is not known ahead, and the tokenizer's own switch point decides."""
        limited = {s.name for s in self.plan.data.sources
                   if self.plan.budgets()[s.name] is not None or s.max_documents is not None}
        self.tok.expect(sum(u.size for u in units if u.source not in limited))

    def run_ranks(self, rank: int, world: int) -> None:
        """Round-robin share of a datatrove task: units rank, rank + world, ..."""
        self.expect(self.plan.units[rank::world])
        for unit in self.plan.units[rank::world]:
            if not self.done(unit) and not self.over_budget(unit):
                self.process(unit)


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


# --- finalize -------------------------------------------------------------------------------
def _add(counter: dict, name: str, docs: int, chars: int) -> None:
    entry = counter.setdefault(name, {"docs": 0, "chars": 0})
    entry["docs"] += docs
    entry["chars"] += chars


def _docs_within(tokens: np.ndarray, taken_tokens: int, budget: int | None, taken_docs: int,
                 max_docs: int | None) -> int:
    """How many of a unit's documents (token counts `tokens`, in order) are taken before the budget
    or max_documents is met; the document that crosses the budget is taken whole."""
    keep = len(tokens)
    if budget is not None:
        keep = min(keep, int(np.searchsorted(np.cumsum(tokens), budget - taken_tokens, side="left")) + 1)
    if max_docs is not None:
        keep = min(keep, max_docs - taken_docs)
    return keep


def _cut_unit(plan: Plan, summary: dict, table: np.ndarray, keep: int) -> dict[str, list[dict]]:
    """Cuts a unit's shards to its first `keep` documents, in place; returns the files that remain."""
    files: dict[str, list[dict]] = {}
    for split in SPLITS:
        rows = table[table[:, 2] == (split == "val")]       # this split's documents, in order
        wanted = int(((table[:keep, 2] == 1) == (split == "val")).sum())
        files[split], first = [], 0
        for f in summary["files"][split]:
            n = min(f["docs"], max(0, wanted - first))
            shards.keep_documents(plan.data_dir / f["file"], n)
            if n:
                part = rows[first:first + n]
                files[split].append({"file": f["file"], "docs": n, "chars": int(part[:, 1].sum()),
                                     "tokens": int(part[:, 0].sum())})
            first += f["docs"]
    return files


class _Summaries:
    """The units' summaries, tokenizing here a unit that a worker skipped as past the budget but
    that is needed after all (dedup removed more than the margin allowed for)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.processor: UnitProcessor | None = None

    def load(self, unit: WorkUnit) -> dict:
        path = self.plan.unit_path(unit)
        if not path.is_file():
            self.processor = self.processor or UnitProcessor(self.plan)
            self.processor.process(unit)
        return json.loads(path.read_text())


def _finalize_source(plan: Plan, source: Source, summaries: _Summaries) -> tuple[dict, Counter, list[str]]:
    """One source's manifest entry from its units' summaries in plan order, until its budget or
    max_documents is met; returns it with its skipped-record counts and bad-record examples."""
    data = plan.data
    units = [u for u in plan.units if u.source == source.name]
    budget = plan.budgets()[source.name]
    skipped: Counter = Counter()
    removed: dict[str, dict] = {}
    rules: Counter = Counter()
    bad: list[str] = []
    read = [0, 0]
    files: dict[str, list[dict]] = {split: [] for split in SPLITS}
    taken_tokens = taken_docs = used = 0

    def full() -> bool:
        return (budget is not None and taken_tokens >= budget) or (
            source.max_documents is not None and taken_docs >= source.max_documents)

    for unit in units:
        if full():
            break
        used += 1
        summary = summaries.load(unit)
        read[0] += summary["read"][0]
        read[1] += summary["read"][1]
        skipped.update(summary["skipped"])
        rules.update(summary["quality_rules"])
        for name, (d, c) in summary["removed"].items():
            _add(removed, name, d, c)
        bad += summary["bad"]
        unit_files, tokens, docs = summary["files"], summary["tokens"], summary["docs"]
        crosses = ((budget is not None and taken_tokens + tokens >= budget)
                   or (source.max_documents is not None and taken_docs + docs >= source.max_documents))
        if crosses:  # only this unit's small per-document table is read
            table = np.load(plan.unit_path(unit, "docs.npy"))
            keep = _docs_within(table[:, 0], taken_tokens, budget, taken_docs, source.max_documents)
            if keep < docs:
                unit_files = _cut_unit(plan, summary, table, keep)
                _add(removed, "budget", docs - keep, int(table[keep:, 1].sum()))
                tokens, docs = int(table[:keep, 0].sum()), keep
        for split in SPLITS:
            files[split] += unit_files[split]
        taken_tokens += tokens
        taken_docs += docs
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
        **{split: {**{k: sum(f[k] for f in files[split]) for k in ("docs", "chars", "tokens")}, "shards": files[split]}
           for split in SPLITS},
    }
    return entry, skipped, bad


def _remove_unlisted(plan: Plan, sources: dict[str, dict]) -> None:
    """Deletes every file under train/ and val/ that the manifest does not list: shards of units
    past a budget, and what killed workers left (a `.tmp` data file, a unit later skipped)."""
    listed = {f["file"] + suffix for s in sources.values() for split in SPLITS for f in s[split]["shards"]
              for suffix in ("", ".index", ".metadata")}
    for split in SPLITS:
        root = plan.data_dir / split
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*"), reverse=True):  # files before their folders
            if path.is_file() and str(path.relative_to(plan.data_dir)) not in listed:
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        if not any(root.iterdir()):
            root.rmdir()


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
    atomic_write(plan.data_dir / MANIFEST, (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode())
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
    """Budget, manifest and clean-up from the units' summaries (tokenizing a unit still needed).

    The manifest's `phases` holds `phases` (the earlier ones, timed by the caller) and this one's;
    a finalize run alone (a Slurm job) records only itself."""
    clock = clock or PhaseClock()
    tok = load_tokenizer(plan.tokenizer)
    summaries = _Summaries(plan)
    sources: dict[str, dict] = {}
    skipped: Counter = Counter()
    bad: list[str] = []
    for source in plan.data.sources:
        sources[source.name], source_skipped, source_bad = _finalize_source(plan, source, summaries)
        skipped.update(source_skipped)
        bad += source_bad
    _remove_unlisted(plan, sources)
    phases = {**(phases or {}), "finalize": clock.lap(tasks=1)}
    manifest = _write_manifest(plan, tok, sources, skipped, bad, phases)
    if skipped:
        log.warning("skipped %d bad record(s) (%s); first: %s", sum(skipped.values()),
                    ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())), "; ".join(bad[:BAD_EXAMPLES]))
    shutil.rmtree(plan.data_dir / ".work", ignore_errors=True)
    return manifest


# --- local parallel run ---------------------------------------------------------------------
STAGES = ("signatures", "buckets", "units")   # the parallel stages, in the order they run


class StageTasks:
    """Runs items of the parallel stages in one process: a unit (signatures, units) or a bucket
    task's rank (buckets, out of `world`). Holds the processors, made on first use."""

    def __init__(self, plan: Plan, threads: int, world: int, progress: Callable[[int, int, int], None] | None = None):
        self.plan, self.threads, self.world, self.progress = plan, threads, world, progress
        self._signatures: dedup.SignatureProcessor | None = None
        self._units: UnitProcessor | None = None

    def run(self, stage: str, item: int) -> None:
        if stage == "buckets":
            dedup.find_pairs(self.plan, item, self.world)
            return
        unit = self.plan.units[item]
        if stage == "signatures":
            self._signatures = self._signatures or dedup.SignatureProcessor(self.plan)
            if not self._signatures.done(unit):
                self._signatures.process(unit, self.progress)
            return
        if self._units is None:
            self._units = UnitProcessor(self.plan, self.threads)
            self._units.expect(self.plan.units[::self.world])  # about a worker's share of the pool's queue
        if not self._units.done(unit) and not self._units.over_budget(unit):
            self._units.process(unit, self.progress)

    def todo(self, stage: str) -> list[int]:
        if stage == "buckets":
            return [r for r in range(self.world) if not dedup.bucket_path(self.plan, r, self.world).is_file()]
        done = self.plan.sig_path if stage == "signatures" else (lambda i: self.plan.unit_path(self.plan.units[i]))
        return [u.index for u in self.plan.units if not done(u.index).is_file()]


_tasks: StageTasks | None = None


def _die_with_parent(parent: int) -> None:
    """Has the kernel kill this worker when its parent dies: a SIGKILLed parent runs no cleanup, and
    its workers would otherwise wait on the pool's queue forever."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _init_worker(plan_json: dict, data_dir: str, queue, threads: int, world: int, parent: int) -> None:
    global _tasks
    _die_with_parent(parent)
    _tasks = StageTasks(Plan.from_json(plan_json, Path(data_dir)), threads, world, lambda d, t, c: queue.put((d, t, c)))


def _run_item(stage: str, item: int) -> int:
    _tasks.run(stage, item)
    return item


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


def run_local(plan: Plan, workers: int, stage: str = "units", show_progress: bool = True) -> None:
    """One parallel stage's missing items on a pool of `workers` processes (dynamic assignment);
    the bucket stage has `workers` tasks."""
    import multiprocessing as mp
    import queue as queue_mod
    from concurrent.futures import ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    here = StageTasks(plan, available_cores(), workers)
    todo = here.todo(stage)
    if not todo:
        return
    bar = _Progress(sum(plan.units[i].size for i in todo), stage) if show_progress and stage != "buckets" else None
    update = bar.update if bar else (lambda d, t, c: None)
    here.progress = update
    try:
        if workers <= 1:
            for item in todo:
                here.run(stage, item)
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
                                 initargs=(plan.to_json(), str(plan.data_dir), queue, threads, workers, os.getpid())) as pool:
            pending = {pool.submit(_run_item, stage, item) for item in todo}
            try:
                while pending:
                    done, pending = wait(pending, timeout=0.2)
                    drain()
                    for future in done:
                        try:
                            future.result()  # re-raise a worker's exception here
                        except BrokenProcessPool:
                            raise UserError(f"a worker process died (killed by the system, e.g. out of memory?); "
                                            f"{plan.data_dir}: finished work is kept, run the same command "
                                            "again to resume (or lower the workers)") from None
            except BaseException:
                # Leaving the block waits for the pool: only the items in flight finish, not the queued ones.
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
