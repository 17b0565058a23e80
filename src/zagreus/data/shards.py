"""Tokenized shards in datatrove's format, which nanotron reads.

A shard is three files:
  NAME.ds           token ids, little-endian, uint32 when the vocabulary exceeds 65,536 else uint16
  NAME.ds.index     uint64 end offset (in tokens) of every document, little-endian
  NAME.ds.metadata  "tokenizer_name|token_size\\n<tokens>\\n<tokens in human form>\\n"
Beside the shards of a folder, `tokenizer.json` (the identity of the tokenizer that made them)
lets readers refuse shards made with another tokenizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from zagreus.errors import UserError

IDENTITY_FILE = "tokenizer-identity.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u4") if vocab_size > 65536 else np.dtype("<u2")


def human(n: int) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.2f}{unit}" if unit else str(n)
        n /= 1000
    return f"{n:.2f}P"


class ShardWriter:
    """Appends documents to one shard; files appear under their final names only on close()."""

    def __init__(self, path: Path, tokenizer_name: str, vocab_size: int):
        self.path = Path(path)
        self.tokenizer_name = tokenizer_name
        self.dtype = token_dtype(vocab_size)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._data = open(self._tmp, "wb")
        self._ends: list[int] = []
        self.tokens = 0

    def write(self, ids) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self._data.write(arr.tobytes())
        self.tokens += len(arr)
        self._ends.append(self.tokens)

    def close(self) -> None:
        """Write index and metadata, then rename the data file last: its presence marks a complete shard."""
        self._data.close()
        np.asarray(self._ends, dtype="<u8").tofile(str(self.path) + ".index")
        _write_metadata(self.path, self.tokenizer_name, self.dtype.itemsize, self.tokens)
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drops what was written (the data file never got its final name)."""
        self._data.close()
        self._tmp.unlink(missing_ok=True)


def _write_metadata(path: Path, tokenizer_name: str, token_size: int, tokens: int) -> None:
    meta = Path(str(path) + ".metadata")
    tmp = meta.with_name(meta.name + ".tmp")
    tmp.write_text(f"{tokenizer_name}|{token_size}\n{tokens}\n{human(tokens)}\n")
    os.replace(tmp, meta)


def keep_documents(path: Path, docs: int) -> None:
    """Cuts a shard to its first `docs` documents in place (no token is copied), or deletes it for 0.

    Safe to repeat after a kill at any point: the data file is cut first, then the index and
    metadata are replaced, and a repeat computes the same cut from the index's first entries."""
    path = Path(path)
    if docs == 0:
        for suffix in (".index", ".metadata", ""):
            Path(str(path) + suffix).unlink(missing_ok=True)
        return
    meta = read_metadata(path)
    ends = read_document_ends(path)[:docs]
    tokens = int(ends[-1])
    os.truncate(path, tokens * meta["token_size"])
    tmp = Path(str(path) + ".index.tmp")
    ends.tofile(str(tmp))
    os.replace(tmp, str(path) + ".index")
    _write_metadata(path, meta["tokenizer"], meta["token_size"], tokens)


def read_tokens(path: Path) -> np.memmap:
    """The token ids of a shard as a read-only memory map."""
    path = Path(path)
    meta = read_metadata(path)
    return np.memmap(path, dtype=np.dtype(f"<u{meta['token_size']}"), mode="r")


def read_document_ends(path: Path) -> np.ndarray:
    return np.fromfile(str(path) + ".index", dtype="<u8")


def read_metadata(path: Path) -> dict:
    meta_path = Path(str(path) + ".metadata")
    if not meta_path.is_file():
        raise UserError(f"{path}: missing {meta_path.name}; the shard is incomplete, re-run `zagreus data tokenize`")
    lines = meta_path.read_text().splitlines()
    name, size = lines[0].rsplit("|", 1)
    return {"tokenizer": name, "token_size": int(size), "tokens": int(lines[1])}


def write_identity(folder: Path, identity: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / IDENTITY_FILE).write_text(json.dumps(identity, indent=2) + "\n")


def check_identity(folder: Path, identity: dict) -> None:
    """Refuse shards made with another tokenizer than the one about to read them."""
    path = Path(folder) / IDENTITY_FILE
    if not path.is_file():
        raise UserError(f"{folder}: no {IDENTITY_FILE}; these shards were not written by `zagreus data tokenize`")
    theirs = json.loads(path.read_text())
    if theirs.get("fingerprint") != identity.get("fingerprint"):
        raise UserError(
            f"{folder}: shards were made with tokenizer {theirs.get('name')} ({theirs.get('fingerprint')}), "
            f"not {identity.get('name')} ({identity.get('fingerprint')}); re-tokenize or use the matching tokenizer"
        )
