"""Faults of the data stage (issue 15, points 3, 4, 7 and 10), each reproduced for real: compressed and
parquet inputs cut short or corrupted, a SIGKILLed `zagreus data tokenize` whose pool is at work, text
that is not UTF-8, and one huge document."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from conftest import HANDBOOK
from zagreus import tokenizer
from zagreus.data import shards
from zagreus.data.sources import DamagedFile, plan_source, read_unit
from zagreus.recipe import Source
from zagreus.tokenizer import load_tokenizer, train_bpe

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}
CLI = [sys.executable, "-m", "zagreus.cli"]
# Hard cases around the cut points: emoji, CJK, accents, digits, whitespace runs, tabs, CRLF, NBSP,
# U+2028, contractions, code and special-token strings (encoded as text).
HARD = ("Ciao, l'amministratore può farlo… 😀👍🏽 中文字符 日本語のテキスト 1234567 3.14159  \t  x\r\n"
        "  def f(x):\n\treturn x**2  # it's they're we'll\u00a0nbsp\u2028sep <|end_of_text|>   \n\n\n"
        "Ünïcödé   ends with spaces   \n")


def texts(n: int) -> list[str]:
    """n real documents: the shared handbook's pages when present, else generated prose."""
    if HANDBOOK.is_file():
        with HANDBOOK.open(encoding="utf-8") as f:
            pages = [json.loads(line)["text"] for line in f]
        return [pages[i % len(pages)] for i in range(n)]
    return [f"Page {i}.\n" + " ".join(f"The administrator configures service {j} and restarts it." for j in range(60 + i))
            for i in range(n)]


def jsonl(docs: list[str]) -> bytes:
    return "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs).encode()


def tokenize(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "data", "tokenize", "--no-progress", *args], capture_output=True, text=True, env=ENV,
                          timeout=300)


def train_documents(out: Path) -> list[list[int]]:
    """Every train document's token ids, in shard order (shards follow the work units, which differ
    between a compressed file and its plain twin; the documents do not)."""
    docs = []
    for ds in sorted((out / "train").rglob("*.ds")):
        tokens, ends = shards.read_tokens(ds), shards.read_document_ends(ds)
        docs += [tokens[a:b].tolist() for a, b in zip([0, *ends[:-1]], ends)]
    return docs


# --- point 3: compressed and parquet inputs must reach their end marker --------------------------
def test_truncated_gzip_zstd_and_parquet_fail_in_one_line_or_are_skipped_whole(tmp_path):
    docs = texts(30)
    half = jsonl(docs[:15]), jsonl(docs[15:])
    intact, cut, plain = tmp_path / "intact", tmp_path / "cut", tmp_path / "plain"
    for folder in (intact, cut, plain):
        folder.mkdir()
    # Two gzip members and two zstd frames (as pigz/bgzip and pzstd write them), three row groups.
    (intact / "a.jsonl.gz").write_bytes(gzip.compress(half[0]) + gzip.compress(half[1]))
    (intact / "b.jsonl.zst").write_bytes(b"".join(zstandard.ZstdCompressor().compress(h) for h in half))
    pq.write_table(pa.table({"text": docs}), intact / "c.parquet", row_group_size=10)
    for name in ("a.jsonl", "b.jsonl", "c.jsonl"):  # the same documents, uncompressed: the reference
        (plain / name).write_bytes(jsonl(docs))
    sizes = {}
    for f in sorted(intact.iterdir()):
        raw = f.read_bytes()
        sizes[cut / f"cut-{f.name}"] = len(raw) * 6 // 10
        (cut / f"cut-{f.name}").write_bytes(raw[:len(raw) * 6 // 10])

    for damaged, size in sizes.items():
        result = tokenize("--input", str(intact), "--input", str(damaged), "--out", str(tmp_path / f"out-{damaged.name}"))
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"{damaged}: damaged at byte {size}: " in errors[0], result.stderr
        assert "on_error: skip" in errors[0]
        assert not (tmp_path / f"out-{damaged.name}" / "manifest.json").exists()

    skipped = tokenize("--input", str(intact), "--input", str(cut), "--out", str(tmp_path / "skip"), "--on-error", "skip")
    assert skipped.returncode == 0, skipped.stderr
    manifest = json.loads((tmp_path / "skip" / "manifest.json").read_text())
    src = manifest["sources"]["input"]
    assert src["skipped"] == {"damaged_file": 3} and manifest["totals"]["skipped"] == {"damaged_file": 3}
    assert manifest["skipped_examples"] == [f"{f}:byte {size} (damaged_file)" for f, size in sizes.items()]
    assert "damaged_file: 3" in skipped.stderr  # the warning line
    assert src["read"]["docs"] == src["train"]["docs"] == 3 * len(docs)  # nothing of the cut files
    # Intact compressed files give the bytes their uncompressed twins give.
    reference = tokenize("--input", str(plain), "--out", str(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr
    assert train_documents(tmp_path / "skip") == train_documents(tmp_path / "ref")


def test_corrupt_bytes_inside_gzip_zstd_and_parquet_name_their_offset(tmp_path):
    docs = texts(12)
    files = {tmp_path / "a.jsonl.gz": gzip.compress(jsonl(docs)),
             tmp_path / "b.jsonl.zst": zstandard.ZstdCompressor().compress(jsonl(docs))}
    pq.write_table(pa.table({"text": docs}), tmp_path / "c.parquet", row_group_size=4, compression="snappy")
    page = pq.ParquetFile(tmp_path / "c.parquet").metadata.row_group(1).column(0)
    start = page.dictionary_page_offset or page.data_page_offset
    files[tmp_path / "c.parquet"] = (tmp_path / "c.parquet").read_bytes()
    for path, raw in files.items():
        at = start + 8 if path.suffix == ".parquet" else len(raw) // 2
        path.write_bytes(raw[:at] + bytes(b ^ 0xFF for b in raw[at:at + 64]) + raw[at + 64:])
        source = Source(name="s", path=str(path))
        with pytest.raises(DamagedFile) as info:
            [item for unit in plan_source(source, 0, 1 << 20) for item in read_unit(unit, source)]
        message = str(info.value)
        assert message.startswith(f"{path}: damaged at byte ") and "\n" not in message
        offset = info.value.offset
        if path.suffix == ".parquet":
            assert offset == start and "row group 1" in message
        else:
            assert offset <= len(raw) // 2 and "corrupt" in message


# --- point 4: pool workers die with their parent ------------------------------------------------
def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_pool_workers_die_with_a_sigkilled_tokenize_and_a_rerun_completes(tmp_path):
    docs = texts(600)
    big = tmp_path / "big.jsonl"
    big.write_bytes(jsonl(docs) * 5)  # ~30 MB of text: 8 work units, seconds of work for two workers
    out = tmp_path / "out"
    args = [*CLI, "data", "tokenize", "--input", str(big), "--out", str(out), "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    parent, workers = psutil.Process(proc.pid), []
    deadline = time.time() + 60
    while len(workers) < 2 and proc.poll() is None and time.time() < deadline:
        workers = parent.children(recursive=True)
        time.sleep(0.01)
    assert len(workers) >= 2, "the pool never started"
    time.sleep(0.5)  # into their first units
    proc.kill()
    proc.wait()
    try:
        deadline = time.time() + 5
        while any(map(_alive, workers)) and time.time() < deadline:
            time.sleep(0.05)
        assert not [w.pid for w in workers if _alive(w)], "workers outlived their SIGKILLed parent"
    finally:
        for w in workers:
            if _alive(w):
                w.kill()
    rerun = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads((out / "manifest.json").read_text())["totals"]["train"]["docs"] == 5 * len(docs)


# --- point 7: text that is not UTF-8 ------------------------------------------------------------
def test_invalid_utf8_is_skipped_and_named_by_file_and_line_in_jsonl_zstd_and_parquet(tmp_path):
    good = [json.dumps({"text": t}).encode() for t in texts(4)]
    (tmp_path / "a.jsonl").write_bytes(b"\n".join([good[0], good[1], b'{"text": "caf\xe9 au lait"}', good[2]]) + b"\n")
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        b"\n".join([good[3], b'{"text": "\xff\xfe broken"}']) + b"\n"))
    # pyarrow writes bytes into a string column unchecked (as other writers may), then fails to read them
    column = pa.array([t.encode() for t in texts(3)[:1]] + [b"na\xefve \xc3"] + [texts(3)[2].encode()],
                      pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": column}), tmp_path / "c.parquet")
    result = tokenize("--input", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    warning = next(line for line in result.stderr.splitlines() if "skipped" in line)
    for where in (f"{tmp_path / 'a.jsonl'}:3", f"{tmp_path / 'b.jsonl.zst'}:2", f"{tmp_path / 'c.parquet'}:row 1"):
        assert f"{where} (invalid_utf8)" in warning, warning
    src = json.loads((tmp_path / "out" / "manifest.json").read_text())["sources"]["input"]
    assert src["skipped"] == {"invalid_utf8": 3} and src["train"]["docs"] == 6


# --- point 10: one huge document ----------------------------------------------------------------
@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Path:
    """A small trained BPE: the Hugging Face backend, as `tokenizer: {train: ...}` makes one."""
    out = tmp_path_factory.mktemp("bpe")
    train_bpe(texts(60), 1000, out)
    return out


@pytest.mark.parametrize("spec", ["llama3", "bpe"])
def test_a_long_text_encoded_in_pieces_gives_the_ids_of_the_whole(spec, bpe, monkeypatch):
    tok = load_tokenizer("llama3" if spec == "llama3" else str(bpe))
    real = "\n\n".join(texts(635 if spec == "llama3" else 80))  # the whole handbook; 1 MB of it for the slower BPE
    for text, size in ((real, 300), (HARD * 20 + real[:20_000] + HARD, 1)):  # size 1: a cut at every cut point
        monkeypatch.setattr(tokenizer, "CHUNK_CHARS", len(text) + 1)
        whole = tok.encode(text)
        monkeypatch.setattr(tokenizer, "CHUNK_CHARS", size)
        assert len(list(tokenizer._pieces(text, size))) > len(text) // 2000
        assert tok.encode(text) == whole
        assert tok.encode_batch(["short one", text, HARD]) == [tok.encode("short one"), whole, tok.encode(HARD)]


def test_a_bpe_trained_on_a_long_text_in_pieces_is_the_bpe_of_the_whole(tmp_path, monkeypatch):
    text = "\n\n".join(texts(80)) + HARD
    monkeypatch.setattr(tokenizer, "CHUNK_CHARS", len(text) + 1)
    train_bpe([text], 1000, tmp_path / "whole")
    monkeypatch.setattr(tokenizer, "CHUNK_CHARS", 300)
    train_bpe([text], 1000, tmp_path / "pieces")
    assert (tmp_path / "pieces" / "tokenizer.json").read_bytes() == (tmp_path / "whole" / "tokenizer.json").read_bytes()


def test_one_huge_document_trains_and_tokenizes_in_bounded_memory(tmp_path):
    """20 MB in one document, a BPE trained on it then encoding it (the Hugging Face backend, as in the tiny
    recipe): 3.76 GB peak RSS when both took the text at once, 0.62 GB in pieces (measured on this test)."""
    real = "\n\n".join(texts(635))
    doc = (real * (20_000_000 // len(real) + 1))[:20_000_000]
    (tmp_path / "huge.jsonl").write_bytes(jsonl([doc]))
    recipe = tmp_path / "huge.yaml"
    recipe.write_text(json.dumps({  # JSON is YAML
        "name": "huge", "run_dir": str(tmp_path / "run"), "tokenizer": {"train": {"vocab_size": 1000}},
        "data": {"sources": [{"name": "huge", "path": str(tmp_path / "huge.jsonl")}],
                 "filters": {"min_chars": 1, "max_chars": 100_000_000, "quality": False, "dedup": "none"},
                 "validation_fraction": 0, "executor": {"workers": 1}}}))
    measure = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
               "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    result = subprocess.run([sys.executable, "-c", measure, *CLI, "data", "tokenize", str(recipe), "--no-progress"],
                            capture_output=True, text=True, env=ENV, timeout=600)
    rc, peak_kb = map(int, result.stdout.split())
    assert rc == 0, result.stderr
    totals = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())["totals"]["train"]
    assert totals["docs"] == 1 and totals["chars"] == len(doc)
    assert peak_kb < 1_000_000, f"peak RSS {peak_kb / 1e6:.2f} GB for a {len(doc) / 1e6:.0f} MB document"
