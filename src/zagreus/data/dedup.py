"""Deduplication as a distributed pass over the work units, before any token is written.

Exact and MinHash dedup keep the first occurrence, in plan order, of every group of duplicates
in the whole corpus (all sources). Three stages, each restartable, each task's memory bounded by
its share of the corpus, not by the corpus:

1. signatures (any number of tasks, round-robin over units): a unit's documents that pass the
   filters get an exact key (BLAKE2b of the normalised text) and, for `dedup: minhash`, a MinHash
   signature and its LSH band keys. Per unit, for every key row (row 0 exact, then one per band),
   the keys are stored sorted with the document they belong to (`sigs/NNNNN.keys.npy`,
   `.docs.npy`), the signatures beside them (`.sig.npy`), the filters' counts in `.json` (last).
2. buckets (W tasks): task r takes the keys in the r-th of W equal ranges of the 64-bit key space,
   reading from every unit's sorted rows only that range (a binary search on a memory map).
   Documents with equal keys in a row are candidates; each is paired with the group's first
   document, MinHash pairs are kept when their estimated Jaccard similarity reaches the threshold.
   Output: the pairs, `buckets/R-of-W.npy`.
3. clusters (one task, memory proportional to the duplicates, not the corpus): the pairs'
   connected components; all but each component's first document are removed. Output: the
   removed ids, sorted, with their reason (`removed-ids.npy`, `removed-why.npy`, `removed.json` last).

The tokenize pass then looks up its unit's removals by binary search on the memory-mapped list.
A document's id is `unit index << 32 | k`, k its place among the unit's documents that passed the
filters: ids sort in plan order, so "first" never depends on the number of tasks. Like datatrove's
multi-stage MinHash, a group is the transitive closure of the pairs: A~B and B~C remove B and C.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from zagreus.data.filters import MinHasher, band_keys, text_digest
from zagreus.data.plan import Plan, atomic_save, atomic_write
from zagreus.data.sources import DamagedFile, WorkUnit
from zagreus.data.units import DocFilter, UnitTally, on_damaged_file

REASONS = ("exact_dedup", "minhash_dedup")   # removed-why.npy holds the index
EXACT, NEAR = 0, 1
LOW = np.uint64(0xFFFFFFFF)


def doc_id(unit: int, k: np.ndarray | int) -> np.ndarray:
    return (np.uint64(unit) << np.uint64(32)) | np.asarray(k, dtype=np.uint64)


class SignatureProcessor:
    """Stage 1 for the units of one process."""

    def __init__(self, plan: Plan):
        self.plan = plan
        m = plan.data.filters.minhash
        self.minhash = MinHasher(m.num_perm, m.ngram) if plan.data.filters.dedup == "minhash" else None
        self.filter = DocFilter(plan)

    def done(self, unit: WorkUnit) -> bool:
        return self.plan.sig_path(unit.index).is_file()

    def process(self, unit: WorkUnit, progress=None) -> None:
        tally = UnitTally()
        ordinals, keys, sigs = [], [], []
        try:
            for ordinal, text in self.filter.kept(unit, tally):
                ordinals.append(ordinal)
                keys.append(text_digest(text)[0])
                if self.minhash is not None:
                    sigs.append(self.minhash.signature(text))
        except DamagedFile as exc:  # the whole file is left out, as the tokenize pass will see
            tally, ordinals, keys, sigs = UnitTally(), [], [], []
            tally.skip(on_damaged_file(exc, self.plan.data.on_error))
        if progress:
            progress(len(ordinals), 0, unit.size)
        m = self.plan.data.filters.minhash
        signatures = np.stack(sigs) if sigs else np.zeros((len(ordinals), m.num_perm if self.minhash else 0), np.uint32)
        rows = [np.asarray(keys, dtype=np.uint64)]
        if self.minhash is not None:
            rows += list(band_keys(signatures, m.bands).T)
        table = np.stack(rows) if ordinals else np.zeros((len(rows), 0), np.uint64)
        order = np.argsort(table, axis=1, kind="stable")
        atomic_save(self.plan.sig_path(unit.index, "ordinals.npy"), np.asarray(ordinals, dtype=np.uint32))
        atomic_save(self.plan.sig_path(unit.index, "keys.npy"), np.take_along_axis(table, order, axis=1))
        atomic_save(self.plan.sig_path(unit.index, "docs.npy"), order.astype(np.uint32))
        atomic_save(self.plan.sig_path(unit.index, "sig.npy"), signatures)
        atomic_write(self.plan.sig_path(unit.index), json.dumps({"unit": unit.index, **tally.summary(),
                                                                  "docs": len(ordinals)}).encode())

    def run_ranks(self, rank: int, world: int) -> None:
        for unit in self.plan.units[rank::world]:
            if not self.done(unit):
                self.process(unit)


def bucket_path(plan: Plan, rank: int, world: int) -> Path:
    return plan.work_dir / "buckets" / f"{rank:05d}-of-{world:05d}.npy"


def _key_range(rank: int, world: int) -> tuple[np.uint64, np.uint64 | None]:
    lo, hi = (rank << 64) // world, ((rank + 1) << 64) // world
    return np.uint64(lo), (np.uint64(hi) if hi < 1 << 64 else None)


def _signatures_of(plan: Plan, ids: np.ndarray) -> np.ndarray:
    """The MinHash signatures of documents `ids`, read from their units' memory maps."""
    out = np.zeros((len(ids), plan.data.filters.minhash.num_perm), np.uint32)
    units = ids >> np.uint64(32)
    for u in np.unique(units):
        here = units == u
        out[here] = np.load(plan.sig_path(int(u), "sig.npy"), mmap_mode="r")[(ids[here] & LOW).astype(np.int64)]
    return out


def find_pairs(plan: Plan, rank: int, world: int) -> None:
    """Stage 2, task `rank` of `world`: the duplicate pairs among the keys of its range."""
    out = bucket_path(plan, rank, world)
    if out.is_file():
        return
    lo, hi = _key_range(rank, world)
    rows = 1 + (plan.data.filters.minhash.bands if plan.data.filters.dedup == "minhash" else 0)
    keys: list[list[np.ndarray]] = [[] for _ in range(rows)]
    ids: list[list[np.ndarray]] = [[] for _ in range(rows)]
    for unit in plan.units:
        table = np.load(plan.sig_path(unit.index, "keys.npy"), mmap_mode="r")
        if table.shape[1] == 0:
            continue
        docs = np.load(plan.sig_path(unit.index, "docs.npy"), mmap_mode="r")
        for r in range(rows):
            a = int(np.searchsorted(table[r], lo))
            b = int(np.searchsorted(table[r], hi)) if hi is not None else table.shape[1]
            if b > a:
                keys[r].append(np.array(table[r, a:b]))
                ids[r].append(doc_id(unit.index, docs[r, a:b]))
    pairs = []
    for r in range(rows):
        if not keys[r]:
            continue
        k, i = np.concatenate(keys[r]), np.concatenate(ids[r])
        order = np.lexsort((i, k))
        k, i = k[order], i[order]
        starts = np.concatenate([[True], k[1:] != k[:-1]])   # where a group of equal keys begins
        first_of_group, group = np.flatnonzero(starts), np.cumsum(starts) - 1
        later = np.flatnonzero(~starts)
        if len(later) == 0:
            continue
        pair = np.stack([i[first_of_group[group[later]]], i[later]], axis=1)
        pairs.append(np.column_stack([pair, np.full(len(pair), EXACT if r == 0 else NEAR, np.uint64)]))
    found = np.concatenate(pairs) if pairs else np.zeros((0, 3), np.uint64)
    exact, near = found[found[:, 2] == EXACT], found[found[:, 2] == NEAR]
    if len(near):  # a band shared by chance: kept only when the signatures agree enough
        near = np.unique(near, axis=0)
        sa, sb = _signatures_of(plan, near[:, 0]), _signatures_of(plan, near[:, 1])
        near = near[(sa == sb).mean(axis=1) >= plan.data.filters.minhash.threshold]
    atomic_save(out, np.concatenate([exact, near]))


def removed_marker(plan: Plan) -> Path:
    return plan.work_dir / "removed.json"


def cluster(plan: Plan, world: int) -> None:
    """Stage 3: the documents to remove, from the pairs of all `world` bucket tasks."""
    if removed_marker(plan).is_file():
        return
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    missing = [r for r in range(world) if not bucket_path(plan, r, world).is_file()]
    if missing:
        raise RuntimeError(f"{plan.work_dir}: bucket task(s) {missing[:5]} of {world} have not finished")
    pairs = np.concatenate([np.load(bucket_path(plan, r, world)) for r in range(world)])
    nodes = np.unique(pairs[:, :2])
    a, b = np.searchsorted(nodes, pairs[:, 0]), np.searchsorted(nodes, pairs[:, 1])
    graph = coo_matrix((np.ones(len(pairs), np.int8), (a, b)), shape=(len(nodes), len(nodes)))
    _, label = connected_components(graph, directed=False)
    keep = np.zeros(len(nodes), bool)
    keep[np.unique(label, return_index=True)[1]] = True   # nodes are sorted: a component's first is its earliest
    removed = nodes[~keep]
    exact_copies = np.unique(pairs[pairs[:, 2] == EXACT][:, 1])
    why = np.where(np.isin(removed, exact_copies), EXACT, NEAR).astype(np.uint8)
    atomic_save(plan.work_dir / "removed-ids.npy", removed)
    atomic_save(plan.work_dir / "removed-why.npy", why)
    atomic_write(removed_marker(plan), json.dumps({"pairs": len(pairs), "removed": len(removed)}).encode())


class UnitDedup:
    """What the tokenize pass needs of a deduplicated unit: which documents to take and why the
    others were removed."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.ids = np.load(plan.work_dir / "removed-ids.npy", mmap_mode="r")
        self.why = np.load(plan.work_dir / "removed-why.npy", mmap_mode="r")

    def unit(self, unit: WorkUnit) -> tuple[dict, dict[int, str | None]]:
        """(the signature pass's summary of the unit, ordinal -> None for a document to tokenize or
        the reason it was removed) for every document that passed the filters."""
        summary = json.loads(self.plan.sig_path(unit.index).read_text())
        ordinals = np.load(self.plan.sig_path(unit.index, "ordinals.npy"))
        a = int(np.searchsorted(self.ids, doc_id(unit.index, 0), side="left"))
        b = int(np.searchsorted(self.ids, doc_id(unit.index, LOW), side="right"))
        fate: dict[int, str | None] = {int(o): None for o in ordinals}
        for did, why in zip(self.ids[a:b], self.why[a:b]):
            fate[int(ordinals[int(did & LOW)])] = REASONS[int(why)]
        return summary, fate

