"""Training batches from tokenized shards: memory-mapped windows, mixed across sources by weight.

Every source's shards (data/<split>/<source>/*.ds) are cut into windows of seq_len + 1 tokens
(inputs and next-token targets; consecutive windows share one token). Each source's windows are
visited in a pseudo-random order fixed by the seed — a Feistel permutation, so even billions of
windows need no index in memory — and re-shuffled every epoch.

Sources are interleaved deterministically: the next sample of the global stream comes from the
source furthest behind its weight's share. So the whole state of the loader is the number of
samples consumed per source (and the position in the global stream is their sum): a few
integers saved in every checkpoint, identical on every rank.

Data parallelism: the global stream is dealt round-robin, sample g going to rank g % world; a
rank only reads its own windows, and world ranks with micro-batch B together consume exactly
the samples one process would with micro-batch B x world.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zagreus.data.shards import check_identity, read_metadata, read_tokens
from zagreus.errors import UserError

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


def _mix(x: int, key: int) -> int:
    """splitmix64 finaliser of x ^ key: the Feistel round function."""
    z = (x ^ key) + 0x9E3779B97F4A7C15 & _MASK64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
    return z ^ (z >> 31)


class FeistelPermutation:
    """A seeded bijection of range(n), evaluated one index at a time in O(1) memory."""

    def __init__(self, n: int, seed: int, rounds: int = 4):
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2  # two equal halves; the domain is then < 4n, so cycle walking is short
        self.half = bits // 2
        self.half_mask = (1 << self.half) - 1
        self.keys = [_mix(seed, 0xA5A5 + r) for r in range(rounds)]

    def _once(self, x: int) -> int:
        left, right = x >> self.half, x & self.half_mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right, key) & self.half_mask)
        return (left << self.half) | right

    def __call__(self, i: int) -> int:
        x = self._once(i)
        while x >= self.n:  # cycle walking keeps the result inside range(n)
            x = self._once(x)
        return x


@dataclass
class _Source:
    name: str
    weight: float
    shards: list[np.memmap]
    starts: np.ndarray  # cumulative window counts, starts[i] = first window of shard i
    windows: int
    seed: int
    _perm_epoch: int = -1
    _perm: FeistelPermutation | None = None

    def window(self, k: int, seq_len: int, shuffle: bool) -> np.ndarray:
        """The k-th sample this source hands out (k counts across epochs)."""
        epoch, j = divmod(k, self.windows)
        if shuffle:
            if epoch != self._perm_epoch:
                self._perm = FeistelPermutation(self.windows, _mix(self.seed, epoch))
                self._perm_epoch = epoch
            j = self._perm(j)
        shard = int(np.searchsorted(self.starts, j, side="right")) - 1
        offset = (j - int(self.starts[shard])) * seq_len
        return self.shards[shard][offset : offset + seq_len + 1]


def source_names(data_dir: Path, split: str) -> list[str]:
    folder = Path(data_dir) / split
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


class TokenLoader:
    """Micro-batches {"input": [B, T], "target": [B, T]} (int64) for one data-parallel rank."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int, micro_batch: int, *,
                 weights: dict[str, float] | None = None, seed: int = 0, rank: int = 0, world: int = 1,
                 identity: dict | None = None, shuffle: bool = True):
        data_dir = Path(data_dir)
        if identity is not None:
            check_identity(data_dir, identity)
        names = source_names(data_dir, split)
        if weights is not None:
            missing = [n for n in weights if n not in names]
            if missing:
                raise UserError(f"{data_dir}/{split}: no shards for source(s) {', '.join(missing)}; "
                                f"run `zagreus data tokenize RECIPE` again")
            names = [n for n in names if n in weights]
        if not names:
            raise UserError(f"{data_dir}/{split}: no tokenized shards; run `zagreus data tokenize RECIPE` first")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world {world}")
        self.seq_len, self.micro_batch, self.rank, self.world, self.shuffle = seq_len, micro_batch, rank, world, shuffle
        self.sources: list[_Source] = []
        for index, name in enumerate(names):
            src = self._open_source(data_dir / split / name, name, (weights or {}).get(name, 1.0), _mix(seed, index))
            if src.windows == 0:
                log.warning("%s/%s/%s: fewer than %d tokens, source left out of this split", data_dir, split, name, seq_len + 1)
                continue
            self.sources.append(src)
        if not self.sources:
            raise UserError(f"{data_dir}/{split}: no source has {seq_len + 1} tokens; lower pretrain.seq_len or add data")
        total = sum(s.weight for s in self.sources)
        self.shares = np.array([s.weight / total for s in self.sources])
        self.consumed = np.zeros(len(self.sources), dtype=np.int64)

    def _open_source(self, folder: Path, name: str, weight: float, seed: int) -> _Source:
        shards, counts = [], []
        for path in sorted(folder.glob("*.ds")):
            read_metadata(path)  # refuses incomplete shards with a clear message
            tokens = read_tokens(path)
            shards.append(tokens)
            counts.append(max(0, (len(tokens) - 1) // self.seq_len))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if counts else np.zeros(0, np.int64)
        return _Source(name, weight, shards, starts, int(sum(counts)), seed)

    # --- the global stream --------------------------------------------------------------
    def _next_source(self) -> int:
        """The source furthest behind its share after the next sample (ties: the first listed)."""
        deficit = self.shares * (self.consumed.sum() + 1) - self.consumed
        return int(np.argmax(deficit))

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's next micro-batch; the global stream advances micro_batch x world samples."""
        rows = []
        for g in range(self.micro_batch * self.world):
            s = self._next_source()
            if g % self.world == self.rank:
                src = self.sources[s]
                rows.append(np.asarray(src.window(int(self.consumed[s]), self.seq_len, self.shuffle), dtype=np.int64))
            self.consumed[s] += 1
        window = torch.from_numpy(np.stack(rows))
        return {"input": window[:, :-1], "target": window[:, 1:]}

    def __iter__(self):
        while True:
            yield self.next_batch()

    # --- state --------------------------------------------------------------------------
    def samples_per_source(self) -> dict[str, int]:
        return {s.name: int(c) for s, c in zip(self.sources, self.consumed)}

    def tokens_per_source(self) -> dict[str, int]:
        """Tokens trained on per source, over all ranks (each sample brings seq_len predictions)."""
        return {name: n * self.seq_len for name, n in self.samples_per_source().items()}

    def state_dict(self) -> dict:
        return {"samples_per_source": self.samples_per_source(), "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seq_len", self.seq_len) != self.seq_len:
            raise UserError(f"the checkpoint was trained with seq_len {state['seq_len']}, the recipe asks {self.seq_len}; "
                            f"keep pretrain.seq_len or start a new run directory")
        counts = state["samples_per_source"]
        unknown = set(counts) - {s.name for s in self.sources}
        if unknown:
            raise UserError(f"checkpoint data state names source(s) {sorted(unknown)} that the data folder lacks")
        self.consumed = np.array([counts.get(s.name, 0) for s in self.sources], dtype=np.int64)
