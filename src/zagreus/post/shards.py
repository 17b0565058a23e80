"""Chat and preference datasets tokenized once, to memory-mapped token shards on disk.

`prepare_shards` streams the recipe's datasets row by row and cuts each into work units: blocks of
`unit_rows` consecutive input rows of one dataset (dataset d, block b). Unit (d, b) is tokenized by
rank (d + b) % world; every rank reads every row (JSON parsing only) but normalises and tokenizes
only its own units, so memory is bounded by one unit whatever the dataset's size. A unit is written
as

    unit-DDD-BBBBB.ids.npy      uint32, the unit's token ids laid end to end
    unit-DDD-BBBBB.labels.npy   int32, the next-token targets (-100 where no loss), same layout
    unit-DDD-BBBBB.lengths.npy  int32 [items, per_item], the length of each sequence
    unit-DDD-BBBBB.json         the counts of its rows; written last, it marks the unit complete

each through a temporary file and os.replace, so a unit with a marker is whole: a rerun after a
kill skips those and gives the same bytes as an uninterrupted run. `key.json` holds what the units
were made from (the caller's key: datasets, template, seq_len, tokenizer); a different key starts
over. When every rank is done, rank 0 applies max_examples (the first max_examples usable rows of a
dataset, across its units in order), deletes units past that cut and
writes manifest.json: the key, the units and their item counts, the data counts. `ChatShards.open`
maps the units read-only; an item is a conversation (SFT, one sequence) or a pair (DPO, chosen
then rejected).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from zagreus.errors import UserError
from zagreus.post.datasets import MAX_WARNINGS, LoadStats, Malformed, dataset_name, dataset_rows, row_outcome, summarize

log = logging.getLogger(__name__)

Encoded = tuple[list[tuple[list[int], list[int]]], bool]
"""(sequences, truncated): one (ids, labels) pair per SFT conversation, two (chosen, rejected) per
DPO pair. An encode returns None for an example with nothing to train (counted as dropped), or
([], truncated) for one that is also to be counted as cut at seq_len."""

PER_ITEM = {"sft": 1, "dpo": 2}
WHAT = {"sft": "conversation", "dpo": "pair"}
MANIFEST, KEY, ERROR = "manifest.json", "key.json", "manifest.error"
# One letter per input row in a unit's marker, so that max_examples can cut inside a unit:
# kept (t: and truncated), dropped with no trained token (D: and truncated), no assistant, malformed.
KEPT, USABLE, TRUNCATED, DROPPED = "kt", "ktdD", "tD", "dD"


def _unit_name(d: int, b: int) -> str:
    return f"unit-{d:03d}-{b:05d}"


def _replace(path: Path, write: Callable) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict) -> None:
    _replace(path, lambda f: f.write((json.dumps(obj, sort_keys=True, indent=1) + "\n").encode("utf-8")))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _normal(obj) -> dict:
    """The key as it reads back from JSON, so that a fresh key compares equal to a stored one."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


class _Unit:
    """The rows of one work unit being tokenized, held until the unit is written."""

    def __init__(self, folder: Path, name: str, per_item: int, encode: Callable):
        self.folder, self.name, self.per_item, self.encode = folder, name, per_item, encode
        self.ids: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.lengths: list[list[int]] = []
        self.stats = LoadStats(name)
        self.codes: list[str] = []
        self.problem_rows: list[int] = []

    def add(self, outcome) -> None:
        row, problems = self.stats.rows, len(self.stats.first_problems)
        example = self.stats.count(outcome)
        if example is None:
            self.codes.append("m" if isinstance(outcome, Malformed) else "n")
            if len(self.stats.first_problems) > problems:
                self.problem_rows.append(row)
            return
        encoded = self.encode(example)
        seqs, cut = encoded if encoded is not None else ([], False)
        if not seqs:
            self.codes.append("D" if cut else "d")
            return
        if len(seqs) != self.per_item:
            raise ValueError(f"encode gave {len(seqs)} sequences for one example; this kind of data has {self.per_item}")
        lengths = []
        for ids, labels in seqs:
            if len(ids) != len(labels):
                raise ValueError(f"encode gave {len(ids)} ids but {len(labels)} labels")
            self.ids.append(np.asarray(ids, dtype=np.uint32))
            self.labels.append(np.asarray(labels, dtype=np.int32))
            lengths.append(len(ids))
        self.lengths.append(lengths)
        self.codes.append("t" if cut else "k")

    def write(self) -> None:
        """The three arrays, then the marker that says the unit is complete."""
        base = self.folder / self.name
        ids = np.concatenate(self.ids) if self.ids else np.zeros(0, np.uint32)
        labels = np.concatenate(self.labels) if self.labels else np.zeros(0, np.int32)
        lengths = np.array(self.lengths, dtype=np.int32).reshape(-1, self.per_item)
        for suffix, arr in ((".ids.npy", ids), (".labels.npy", labels), (".lengths.npy", lengths)):
            _replace(base.with_name(self.name + suffix), lambda f, a=arr: np.save(f, a))
        codes = "".join(self.codes)
        s = self.stats
        _write_json(base.with_name(self.name + ".json"), {
            "rows": s.rows, "kept": s.kept, "no_assistant": s.no_assistant, "malformed": s.malformed,
            "first_problems": s.first_problems, "problem_rows": self.problem_rows,
            "truncated": sum(map(codes.count, TRUNCATED)), "dropped": sum(map(codes.count, DROPPED)),
            "items": len(self.lengths), "tokens": int(ids.size), "outcomes": codes})


def _enough_on_disk(folder: Path, d: int, last: int, wanted: int, kept: dict[int, int]) -> bool:
    """Whether the markers of units 0..last of dataset d all exist and hold `wanted` usable rows."""
    total = 0
    for b in range(last + 1):
        if b not in kept:
            marker = _read_json(folder / f"{_unit_name(d, b)}.json")
            if marker is None:
                return False
            kept[b] = marker["kept"]
        total += kept[b]
    return total >= wanted


def _tokenize_dataset(folder: Path, d: int, spec, resolve_path, kind: str, encode, rank: int, world: int,
                      unit_rows: int, bar) -> int | None:
    """Tokenize this rank's units of dataset d; the number of blocks, or None when stopped at max_examples."""
    name, per_item = dataset_name(spec), PER_ITEM[kind]
    bar.set_description(f"tokenize {name}" + (f" [rank {rank}]" if world > 1 else ""))
    unit, block, kept_on_disk = None, -1, {}
    for i, (where, row) in enumerate(dataset_rows(spec, resolve_path)):
        b = i // unit_rows
        if b != block:
            if unit is not None:
                unit.write()
                unit = None
            if spec.max_examples is not None and b > 0 and _enough_on_disk(folder, d, b - 1, spec.max_examples, kept_on_disk):
                log.debug("dataset %s: %d usable rows tokenized, stopped at block %d", name, spec.max_examples, b)
                return None
            block = b
            if (d + b) % world == rank and not (folder / f"{_unit_name(d, b)}.json").exists():
                unit = _Unit(folder, _unit_name(d, b), per_item, encode)
        bar.update(1)
        if unit is not None:
            unit.add(row_outcome(row, where, spec.format, kind))
    if unit is not None:
        unit.write()
    return block + 1


def _start(folder: Path, identity: dict) -> None:
    """Rank 0, before any unit is written: units made from other data go, a killed run's stay."""
    folder.mkdir(parents=True, exist_ok=True)
    old = _read_json(folder / KEY)
    ours = sorted(p for p in folder.iterdir() if p.name.startswith("unit-") or p.name in (MANIFEST, KEY, ERROR))
    if old != identity and ours:
        log.info("%s: the data changed (datasets, template, seq_len or tokenizer); tokenizing again", folder)
        for p in ours:
            p.unlink()
    else:
        for p in ours:
            if p.name.endswith(".tmp") or p.name in (MANIFEST, ERROR):
                p.unlink()
    _write_json(folder / KEY, identity)


def _build_manifest(folder: Path, identity: dict, datasets: list, kind: str, blocks: list[int | None]) -> dict:
    """Rank 0, once every rank is done: max_examples applied, units past it deleted, the counts summed."""
    units, loaded, tokenized = [], [], {"kept": 0, "truncated": 0, "dropped": 0}
    for d, (spec, n_blocks) in enumerate(zip(datasets, blocks)):
        stats, left = LoadStats(dataset_name(spec)), spec.max_examples
        b = 0
        while n_blocks is None or b < n_blocks:
            name = _unit_name(d, b)
            marker = _read_json(folder / f"{name}.json")
            if marker is None:
                if n_blocks is None:  # stopped at max_examples: the units read hold enough rows
                    break
                raise UserError(f"{folder / name}.json: unit missing after every rank finished; "
                                f"delete {folder} or rerun with --force")
            codes, problems = marker["outcomes"], list(zip(marker["problem_rows"], marker["first_problems"]))
            last = left is not None and marker["kept"] >= left
            if last:  # cut after the left-th usable row of this unit
                seen = 0
                for r, c in enumerate(codes):
                    seen += c in USABLE
                    if seen == left:
                        break
                codes, problems = codes[: r + 1], [(row, p) for row, p in problems if row <= r]
            elif left is not None:
                left -= marker["kept"]
            items = sum(map(codes.count, KEPT))
            tokens = marker["tokens"]
            if items < marker["items"]:
                tokens = int(np.load(folder / f"{name}.lengths.npy")[:items].sum())
            units.append({"name": name, "dataset": d, "block": b, "items": items, "tokens": tokens})
            stats.rows += len(codes)
            stats.kept += sum(map(codes.count, USABLE))
            stats.no_assistant += codes.count("n")
            stats.malformed += codes.count("m")
            stats.first_problems += [p for _, p in problems][: MAX_WARNINGS - len(stats.first_problems)]
            tokenized["kept"] += items
            tokenized["truncated"] += sum(map(codes.count, TRUNCATED))
            tokenized["dropped"] += sum(map(codes.count, DROPPED))
            b += 1
            if last:
                break
        for p in sorted(folder.glob(f"unit-{d:03d}-*")):  # units another rank tokenized past the cut
            if int(p.name.split(".")[0].split("-")[2]) >= b:
                p.unlink()
        stats.report()
        loaded.append(stats)
    what = WHAT[kind]
    if tokenized["truncated"]:
        log.warning("%d %s(s) longer than seq_len were cut at the end", tokenized["truncated"], what)
    if tokenized["dropped"]:
        log.warning("%d %s(s) had no trained token within seq_len and were dropped", tokenized["dropped"], what)
    stats = {"data": summarize(loaded), "tokenized": {f"{what}s": tokenized["kept"], "truncated": tokenized["truncated"],
                                                      "dropped_no_trained_token": tokenized["dropped"]}}
    return {**identity, "per_item": PER_ITEM[kind], "units": units, "items": sum(u["items"] for u in units),
            "tokens": sum(u["tokens"] for u in units), "stats": stats}


def _tokenize_all(folder: Path, datasets: list, resolve_path, kind: str, encode, unit_rows: int, task: int,
                  tasks: int) -> list[int | None]:
    """Task `task` of `tasks`: its units of every dataset; each dataset's number of blocks (None: stopped early)."""
    with tqdm(unit=" rows", disable=None, position=task, leave=False) as bar:
        return [_tokenize_dataset(folder, d, spec, resolve_path, kind, encode, task, tasks, unit_rows, bar)
                for d, spec in enumerate(datasets)]


def _tokenize_with_workers(folder: Path, datasets: list, resolve_path, kind: str, encode, unit_rows: int,
                           tasks: list[int], total: int) -> list[int | None]:
    """The tasks in forked worker processes (fork: they inherit `encode` and its tokenizer unpickled)."""
    ctx = multiprocessing.get_context("fork")
    results = ctx.SimpleQueue()

    def work(task: int) -> None:
        try:
            results.put((True, _tokenize_all(folder, datasets, resolve_path, kind, encode, unit_rows, task, total)))
        except UserError as exc:  # a bad row or file: the parent says it in one line
            results.put((False, str(exc)))

    procs = [ctx.Process(target=work, args=(task,), daemon=True) for task in tasks]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    failed = [task for task, proc in zip(tasks, procs) if proc.exitcode != 0]
    if failed:
        raise UserError(f"{folder}: tokenizing worker(s) {failed} failed (see the messages above); the finished "
                        f"units are kept, run the same command again to resume")
    answers = [results.get() for _ in procs]
    problems = sorted({msg for ok, msg in answers if not ok})
    if problems:
        raise UserError(problems[0])
    counts = [msg for _, msg in answers]
    # Every task streams every row: one that reached the end knows the count; None only if all stopped early.
    return [next((c[d] for c in counts if c[d] is not None), None) for d in range(len(datasets))]


def prepare_shards(folder: Path, key: dict, datasets: list, resolve_path, kind: str,
                   encode: Callable[[object], Encoded | None], *, rank: int = 0, world: int = 1,
                   barrier: Callable[[], None] = lambda: None, unit_rows: int = 4096,
                   workers: int = 1) -> "ChatShards":
    """Every rank tokenizes its work units into `folder`, rank 0 writes manifest.json, all return the opened shards.

    `key` says what the shards are made from (datasets, template, seq_len, tokenizer identity):
    an existing manifest with the same key is opened without reading the datasets; a different
    one is deleted and the data tokenized again. `datasets` are the recipe's ChatDataset specs,
    `kind` 'sft' or 'dpo'; `encode` turns one example into its sequences (see `Encoded`). Every rank
    calls this with the same arguments and its own `rank`; `barrier` waits for all of them. With
    `workers` > 1 each rank forks that many tokenizing processes (task rank x workers + w of
    world x workers); the bytes written are the same whatever the ranks and workers.
    """
    if kind not in PER_ITEM:
        raise ValueError(f"kind must be 'sft' or 'dpo', not {kind!r}")
    folder = Path(folder)
    identity = _normal({"key": key, "kind": kind, "unit_rows": unit_rows})
    manifest = _read_json(folder / MANIFEST)
    if manifest is not None and {k: manifest.get(k) for k in identity} == identity:
        return ChatShards.open(folder)
    if rank == 0:
        _start(folder, identity)
    barrier()
    args = (folder, datasets, resolve_path, kind, encode, unit_rows)
    blocks = (_tokenize_all(*args, rank, world) if workers == 1
              else _tokenize_with_workers(*args, [rank * workers + w for w in range(workers)], world * workers))
    barrier()
    if rank == 0:
        try:
            _write_json(folder / MANIFEST, _build_manifest(folder, identity, datasets, kind, blocks))
        except UserError as exc:  # every rank stops with it, none waits for a manifest that will not come
            (folder / ERROR).write_text(str(exc), encoding="utf-8")
            barrier()
            raise
    barrier()
    if (folder / ERROR).exists():
        raise UserError((folder / ERROR).read_text(encoding="utf-8"))
    return ChatShards.open(folder)


class ChatShards:
    """The tokenized items of a prepared folder, memory-mapped: `len` items (conversations for SFT,
    pairs for DPO), `per_item` sequences each, `lengths` [len, per_item] their lengths."""

    def __init__(self, folder: Path, manifest: dict, ids: list, labels: list, lengths: np.ndarray, first: np.ndarray):
        self.folder, self.manifest = folder, manifest
        self.kind, self.per_item, self.stats = manifest["kind"], manifest["per_item"], manifest["stats"]
        self.lengths = lengths
        self._ids, self._labels = ids, labels
        # Token offset of every item in the whole set, and of the first item of every mapped unit.
        self._offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths.sum(axis=1, dtype=np.int64), out=self._offsets[1:])
        self._first = first
        self._unit_start = self._offsets[first[:-1]]

    @classmethod
    def open(cls, folder: Path) -> "ChatShards":
        folder = Path(folder)
        fix = f"delete {folder} or rerun with --force to tokenize again"
        manifest = _read_json(folder / MANIFEST)
        if manifest is None:
            raise UserError(f"{folder / MANIFEST}: missing or damaged; {fix}")
        ids, labels, lengths, counts = [], [], [], []
        for unit in manifest["units"]:
            if not unit["items"]:
                continue
            base, path = folder / unit["name"], None
            try:
                path = base.with_name(unit["name"] + ".lengths.npy")
                n = np.load(path)
                if n.ndim != 2 or n.shape[0] < unit["items"] or n.shape[1] != manifest["per_item"]:
                    raise ValueError(f"lengths of shape {n.shape}, the manifest has {unit['items']} items")
                n = n[: unit["items"]]
                if int(n.sum()) != unit["tokens"]:
                    raise ValueError(f"{int(n.sum())} tokens, the manifest has {unit['tokens']}")
                pair = []
                for suffix in (".ids.npy", ".labels.npy"):
                    path = base.with_name(unit["name"] + suffix)
                    arr = np.load(path, mmap_mode="r")
                    if arr.ndim != 1 or arr.shape[0] < unit["tokens"]:
                        raise ValueError(f"{arr.shape[0]} tokens, the manifest has {unit['tokens']}")
                    pair.append(arr)
            except (OSError, ValueError, EOFError) as exc:
                raise UserError(f"{path}: damaged or missing ({exc}); {fix}") from None
            ids.append(pair[0])
            labels.append(pair[1])
            lengths.append(n)
            counts.append(unit["items"])
        per_item = manifest["per_item"]
        all_lengths = np.concatenate(lengths) if lengths else np.zeros((0, per_item), np.int32)
        first = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=first[1:])
        return cls(folder, manifest, ids, labels, all_lengths, first)

    def __len__(self) -> int:
        return len(self.lengths)

    def item(self, i: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The per_item (ids, labels) int64 arrays of item i, copied out of the maps."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"item {i} of {n}")
        i %= n
        u = int(np.searchsorted(self._first, i, side="right")) - 1
        start = int(self._offsets[i] - self._unit_start[u])
        out = []
        for length in self.lengths[i]:
            end = start + int(length)
            out.append((np.array(self._ids[u][start:end], dtype=np.int64),
                        np.array(self._labels[u][start:end], dtype=np.int64)))
            start = end
        return out
