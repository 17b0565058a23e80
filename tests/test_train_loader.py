"""The token loader: seeded shuffles that are permutations, exact mixture, rank sharding, state, identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zagreus.data.loader import FeistelPermutation, TokenLoader
from zagreus.data.shards import ShardWriter, write_identity
from zagreus.errors import UserError

IDENTITY = {"name": "toy", "fingerprint": "abc123", "vocab_size": 1000}
SEQ = 8


def _make(tmp_path, sizes: dict[str, list[int]]):
    """Source s gets shards of the given token counts; token values encode (source, position)."""
    for si, (name, shard_sizes) in enumerate(sizes.items()):
        pos = 0
        for i, n in enumerate(shard_sizes):
            w = ShardWriter(tmp_path / "train" / name / f"{i:05d}.ds", "toy", 70000)  # uint32 ids
            w.write(np.arange(pos, pos + n) + si * 100_000)
            w.close()
            pos += n
    write_identity(tmp_path, IDENTITY)
    return tmp_path


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_feistel_is_a_permutation(n):
    perm = FeistelPermutation(n, seed=5)
    out = [perm(i) for i in range(n)]
    assert sorted(out) == list(range(n))
    if n >= 64:
        assert out != list(range(n)) and out != [FeistelPermutation(n, seed=6)(i) for i in range(n)]


def test_windows_cover_each_epoch_and_match_shards(tmp_path):
    data = _make(tmp_path, {"a": [50, 33]})  # windows: 49//8=6 in the first shard, 32//8=4 in the second
    loader = TokenLoader(data, "train", SEQ, micro_batch=5, identity=IDENTITY, seed=1)
    rows = torch.cat([loader.next_batch()["input"] for _ in range(2)])
    firsts = sorted(int(r[0]) for r in rows)
    assert firsts == [0, 8, 16, 24, 32, 40, 50, 58, 66, 74]  # every window once, none across shards
    loader2 = TokenLoader(data, "train", SEQ, micro_batch=5, identity=IDENTITY, seed=1)
    batch = loader2.next_batch()
    assert torch.equal(batch["target"][:, :-1], batch["input"][:, 1:])
    assert torch.equal(batch["target"][:, -1], batch["input"][:, -1] + 1)  # seq_len + 1 tokens, contiguous
    epoch2 = torch.cat([loader.next_batch()["input"] for _ in range(2)])
    assert sorted(int(r[0]) for r in epoch2) == firsts and not torch.equal(epoch2, rows)  # reshuffled


def test_mixture_follows_weights_exactly(tmp_path):
    data = _make(tmp_path, {"a": [2000], "b": [2000], "c": [500]})
    loader = TokenLoader(data, "train", SEQ, micro_batch=10, weights={"a": 0.5, "b": 0.3, "c": 0.2}, identity=IDENTITY)
    sources = []
    for _ in range(20):
        sources += (loader.next_batch()["input"][:, 0] // 100_000).tolist()
    assert np.bincount(sources).tolist() == [100, 60, 40]
    assert loader.samples_per_source() == {"a": 100, "b": 60, "c": 40}
    assert loader.tokens_per_source() == {"a": 800, "b": 480, "c": 320}
    with pytest.raises(UserError, match="no shards for source"):
        TokenLoader(data, "train", SEQ, 2, weights={"a": 1.0, "zzz": 1.0})


def test_ranks_split_the_single_process_stream(tmp_path):
    data = _make(tmp_path, {"a": [900], "b": [700]})
    single = TokenLoader(data, "train", SEQ, micro_batch=6, seed=4)
    ranks = [TokenLoader(data, "train", SEQ, micro_batch=3, seed=4, rank=r, world=2) for r in range(2)]
    for _ in range(5):
        whole = single.next_batch()["input"]
        parts = [r.next_batch()["input"] for r in ranks]
        assert torch.equal(whole[0::2], parts[0]) and torch.equal(whole[1::2], parts[1])
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_state_resumes_the_stream(tmp_path):
    data = _make(tmp_path, {"a": [900], "b": [300]})
    first = TokenLoader(data, "train", SEQ, micro_batch=4, seed=2, weights={"a": 2, "b": 1})
    for _ in range(7):
        first.next_batch()
    state = first.state_dict()
    expected = [first.next_batch()["input"] for _ in range(30)]  # crosses epoch boundaries of source b
    second = TokenLoader(data, "train", SEQ, micro_batch=4, seed=2, weights={"a": 2, "b": 1})
    second.load_state_dict(state)
    assert all(torch.equal(e, second.next_batch()["input"]) for e in expected)
    with pytest.raises(UserError, match="seq_len"):
        TokenLoader(data, "train", 4, micro_batch=4).load_state_dict(state)


def test_refuses_other_tokenizer_and_missing_data(tmp_path):
    data = _make(tmp_path, {"a": [100]})
    with pytest.raises(UserError, match="re-tokenize"):
        TokenLoader(data, "train", SEQ, 2, identity={**IDENTITY, "fingerprint": "other"})
    with pytest.raises(UserError, match="zagreus data tokenize"):
        TokenLoader(tmp_path / "nowhere", "train", SEQ, 2)
