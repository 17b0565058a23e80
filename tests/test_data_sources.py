"""Readers: every input format, bad input skipped and counted with file:line, clear errors for a
missing path or an unreachable hub dataset, hub records read from a local `datasets` folder."""

from __future__ import annotations

import gzip
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from zagreus.data.sources import Doc, Skip, html_to_text, plan_source, read_unit, stdlib_files
from zagreus.data.stage import quick_data_section, tokenize_data
from zagreus.errors import UserError
from zagreus.recipe import DataSection, Source, TokenizerSection


def read_source(source: Source, unit_bytes: int = 1 << 20) -> list[Doc | Skip]:
    return [item for u in plan_source(source, 0, unit_bytes) for item in read_unit(u, source)]


TEXTS = [f"Document number {i}: " + " ".join(["lorem sit amet"] * (i + 3)) for i in range(7)]


def test_jsonl_compressed_parquet_txt_html_read_the_same_texts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)).encode()
    (tmp_path / "a.jsonl").write_bytes(lines)
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as f:
        f.write(lines)
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"text": TEXTS, "n": list(range(7))}), tmp_path / "d.parquet", row_group_size=3)
    txt = tmp_path / "txt"
    txt.mkdir()
    for i, t in enumerate(TEXTS):
        (txt / f"{i}.txt").write_text(t)
    html = tmp_path / "html"
    html.mkdir()
    for i, t in enumerate(TEXTS):
        (html / f"{i}.html").write_text(f"<html><head><style>p {{color: red}}</style><script>var x = 1;</script></head>"
                                        f"<body><p>{t}</p></body></html>")
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet", "txt", "html"):
        units = plan_source(Source(name="s", path=str(tmp_path / name)), 0, 1 << 20)
        docs = [item for u in units for item in read_unit(u, Source(name="s", path="x"))]
        assert [d.text.strip() for d in docs] == TEXTS, name  # txt files keep their text as written
    assert len(plan_source(Source(name="s", path=str(tmp_path / "d.parquet")), 0, 1 << 20)) == 3  # row groups
    # a glob over several kinds reads them in sorted order
    glob_docs = read_source(Source(name="s", path=str(tmp_path / "[ab].jsonl*")))
    assert [d.text for d in glob_docs] == TEXTS * 2


def test_jsonl_byte_ranges_cover_every_line_exactly_once(tmp_path):
    texts = [f"line {i} " + "x" * (i * 37 % 300) for i in range(400)]
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    for unit_bytes in (1024, 1500, 4096, 1 << 20):
        units = plan_source(Source(name="s", path=str(path)), 0, unit_bytes)
        docs = [d for u in units for d in read_unit(u, Source(name="s", path="x"))]
        assert [d.text for d in docs] == texts, unit_bytes


def test_html_to_text_drops_markup_scripts_and_styles():
    raw = b"<html><script>alert(1)</script><body><h1>Title</h1><p>One  two</p><div>three</div></body></html>"
    assert html_to_text(raw) == "Title\nOne two\nthree"
    assert "alert" not in html_to_text(raw)


def test_bad_lines_are_skipped_counted_and_reported_with_file_and_line(tmp_path, caplog):
    good = [json.dumps({"text": t}).encode() for t in TEXTS]
    lines = [good[0], b'{"text": "unterminated', good[1], b'{"text": "caf\xe9 latin-1"}', good[2],
             json.dumps({"text": "   "}).encode(), good[3], json.dumps({"body": "no text field"}).encode(),
             b"[1, 2]", good[4], good[5], good[6]]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    data = DataSection(**{**quick_data_section([str(path)], workers=2).model_dump(), "unit_bytes": 1024})
    with caplog.at_level(logging.WARNING):
        manifest = tokenize_data(data, tmp_path / "out", TokenizerSection(kind="llama3"), show_progress=False)
    src = manifest["sources"]["input"]
    assert src["skipped"] == {"empty": 1, "invalid_utf8": 1, "malformed_json": 2, "missing_field": 1}
    assert src["train"]["docs"] == 7 and src["read"]["docs"] == 7
    assert manifest["skipped_examples"] == [f"{path}:2 (malformed_json)", f"{path}:4 (invalid_utf8)",
                                            f"{path}:6 (empty)", f"{path}:8 (missing_field)", f"{path}:9 (malformed_json)"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "skipped" in r.getMessage()]
    assert len(warnings) == 1 and f"{path}:2" in warnings[0] and "malformed_json: 2" in warnings[0]


def test_empty_and_undecodable_text_files_are_skipped(tmp_path):
    (tmp_path / "a.txt").write_text("fine text")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe bad bytes \xc3")
    (tmp_path / "c.txt").write_text("  \n ")
    items = read_source(Source(name="s", path=str(tmp_path)))
    assert [type(i).__name__ for i in items] == ["Doc", "Skip", "Skip"]
    assert [i.reason for i in items[1:]] == ["invalid_utf8", "empty"]
    assert items[1].where == str(tmp_path / "b.txt")


def test_missing_path_is_one_clear_error(tmp_path, monkeypatch, capsys):
    with pytest.raises(UserError, match=r"nope/\*.jsonl: no such file or folder"):
        plan_source(Source(name="s", path=str(tmp_path / "nope" / "*.jsonl")), 0, 1 << 20)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match="unsupported file type"):
        plan_source(Source(name="s", path=str(tmp_path / "x.csv")), 0, 1 << 20)
    from zagreus.cli import main

    monkeypatch.setattr(sys, "argv", ["zagreus", "data", "tokenize", "--input", str(tmp_path / "missing.jsonl"),
                                      "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'missing.jsonl'}: no such file or folder (looked for {tmp_path / 'missing.jsonl'}); "
        "fix the path or glob"]
    assert not (tmp_path / "o").exists()  # nothing written


def test_unreachable_hub_dataset_is_one_clear_error(tmp_path):
    code = ("from zagreus.data.sources import plan_source\nfrom zagreus.recipe import Source\n"
            "plan_source(Source(name='fw', hub='HuggingFaceFW/fineweb-2', config='ita_Latn'), 0, 1 << 20)")
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("zagreus.errors.UserError: source 'fw': hub dataset HuggingFaceFW/fineweb-2 "
                           "(config ita_Latn) split train is unreachable")
    assert "use a local path" in last


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_reader_handles_records_of_a_local_datasets_folder(tmp_path, streaming):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "ds" / "data"
    folder.mkdir(parents=True)
    langs = ["en", "it"] * 4
    texts = TEXTS + [""]
    for i, (lo, hi) in enumerate([(0, 5), (5, 8)]):  # two data files: two shards when streamed
        pq.write_table(pa.table({"text": texts[lo:hi], "lang": langs[lo:hi]}), folder / f"train-0000{i}-of-00002.parquet")
    source = Source(name="h", hub=str(tmp_path / "ds"), streaming=streaming, language="it")
    assert len(plan_source(source, 0, 1 << 20)) == (2 if streaming else 1)
    items = read_source(source)
    docs = [i for i in items if isinstance(i, Doc)]
    assert [d.text for d in docs] == [t for t, lang in zip(TEXTS, langs) if lang == "it"]
    assert [i.reason for i in items if isinstance(i, Skip)] == ["empty"]


def test_stdlib_source_reads_python_files(tmp_path):
    files = stdlib_files()
    assert len(files) > 500 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    units = plan_source(Source(name="code", stdlib=True), 0, 1 << 20)
    assert sum(len(u.files) for u in units) == len(files) and len(units) > 5
    first = list(read_unit(units[0], Source(name="code", stdlib=True)))
    assert first and isinstance(first[0], Doc)
    assert first[0].text == Path(units[0].files[0]).read_text(encoding="utf-8")


def test_hub_sources_are_pinned_to_a_commit_recorded_in_the_manifest(tmp_path, monkeypatch):
    """A hub source's revision (a tag here, the main branch without one) is resolved once, at plan time,
    every unit reads at that commit, and the manifest records it. The hub's two services are replaced
    (no network here): `HfApi.dataset_info` answers a commit per revision, `datasets.load_dataset`
    serves a local parquet folder and records the revision it was asked for."""
    import datasets
    import huggingface_hub
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "ds" / "data"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"text": TEXTS}), folder / "train-00000-of-00001.parquet")
    commits = {None: "a" * 40, "v1.0": "b" * 40}
    asked: list = []
    real_load = datasets.load_dataset

    def dataset_info(self, repo_id, revision=None, **kw):
        if revision not in commits and revision not in commits.values():
            raise ValueError(f"Revision Not Found for {repo_id}@{revision}")  # what the hub says, in short
        return type("Info", (), {"sha": commits.get(revision, revision)})()

    def load_dataset(path, name=None, split=None, streaming=False, revision=None):
        asked.append((path, revision))
        return real_load(str(tmp_path / "ds"), name, split=split, streaming=streaming)

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    for revision, sha in ((None, "a" * 40), ("v1.0", "b" * 40)):
        asked.clear()
        data = DataSection(sources=[{"name": "fw", "hub": "HuggingFaceFW/fineweb-2", "revision": revision}],
                           filters={"min_chars": 1, "quality": False, "dedup": "none"}, validation_fraction=0.0,
                           executor={"kind": "local", "workers": 1})
        manifest = tokenize_data(data, tmp_path / f"out-{revision}", TokenizerSection(), show_progress=False)
        assert manifest["sources"]["fw"]["revision"] == sha
        assert asked and all(a == ("HuggingFaceFW/fineweb-2", sha) for a in asked), asked
        assert manifest["totals"]["train"]["docs"] == len(TEXTS)

    bad = DataSection(sources=[{"name": "fw", "hub": "HuggingFaceFW/fineweb-2", "revision": "v9"}])
    with pytest.raises(UserError, match=r"source 'fw': cannot resolve revision v9 of hub dataset "
                                        r"HuggingFaceFW/fineweb-2: Revision Not Found"):
        tokenize_data(bad, tmp_path / "out-bad", TokenizerSection(), show_progress=False)
    # A local datasets folder has no commit: nothing to pin, nothing recorded.
    local = DataSection(sources=[{"name": "h", "hub": str(tmp_path / "ds")}],
                        filters={"min_chars": 1, "quality": False, "dedup": "none"}, validation_fraction=0.0,
                        executor={"kind": "local", "workers": 1})
    assert tokenize_data(local, tmp_path / "out-local", TokenizerSection(), show_progress=False)["sources"]["h"]["revision"] is None
