"""Readers: every kind of source behind one interface of deterministic work units.

A source (recipe `data.sources[i]`) is split at planning time into `WorkUnit`s whose list and
order depend only on the inputs, never on the number of workers:

  * plain `.jsonl` files: byte ranges of `unit_bytes` (recipe `data.unit_bytes`; a line belongs to the range its first
    byte falls in), so one big file still spreads over every worker;
  * `.jsonl.gz` / `.jsonl.zst`: one unit per file (compressed streams cannot be entered midway);
  * `.parquet`: one unit per row group;
  * `.txt`, `.html`/`.htm`, `.py` files (and the Python standard library): files grouped into
    units of about `unit_bytes` (recipe `data.unit_bytes`), one document per file (HTML reduced to its visible text);
  * Hugging Face hub datasets: one unit per shard of the streamed dataset (its data files), or
    per block of `HUB_ROWS` rows when not streaming.

`read_unit(unit, source)` yields `Doc`s and `Skip`s (bad records: malformed JSON, invalid UTF-8,
empty text, missing text field), the latter carrying `file:line` for the warning. A file that
cannot be read to its end (a gzip member or zstd frame cut short, a parquet file without its
footer, corrupt compressed data) raises `DamagedFile` instead, naming the byte: the data stage
then stops or, with `data.on_error: skip`, leaves the whole file out and counts it. Datatrove's
readers are not used for reading: they split work by file only (one 50 GB jsonl would occupy one
task) and build a `Document` per record; here jsonl is read as bytes by range and parsed with
orjson. Datatrove runs the pipeline instead (see executors.py).
"""

from __future__ import annotations

import glob
import io
import logging
import os
import sysconfig
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import orjson
import zstandard

from zagreus.errors import UserError
from zagreus.recipe import Source

log = logging.getLogger(__name__)

HUB_ROWS = 100_000      # rows per unit of a non-streamed hub dataset
TEXT_SUFFIXES = {".txt": "txt", ".html": "html", ".htm": "html", ".py": "code"}
HTML_BLOCKS = ("p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "section",
               "article", "header", "footer", "table", "ul", "ol", "dt", "dd", "title")
SUPPORTED = ".jsonl, .jsonl.gz, .jsonl.zst, .parquet, .txt, .html, .htm, .py"


@dataclass(frozen=True)
class WorkUnit:
    """One deterministic slice of one source; `index` is its place in the merge order."""

    index: int
    source: str
    kind: str              # jsonl | jsonl.gz | jsonl.zst | parquet | files | hub
    path: str = ""         # file (jsonl/parquet) or hub dataset id
    start: int = 0         # byte offset, row group, hub shard or row offset
    stop: int = 0
    files: tuple[str, ...] = ()  # for kind 'files'
    size: int = 0          # bytes of input, for the progress bar

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "WorkUnit":
        return cls(**{**d, "files": tuple(d["files"])})


@dataclass
class Doc:
    text: str


@dataclass
class Skip:
    reason: str  # malformed_json | invalid_utf8 | empty | missing_field | damaged_file
    where: str
    chars: int = 0


class DamagedFile(UserError):
    """An input file that ends or breaks before its end marker; what was read of it is not the whole file."""

    def __init__(self, path: str | Path, offset: int, detail: str):
        super().__init__(str(path), offset, detail)  # all the fields in args: it pickles across the worker pool
        self.path, self.offset, self.detail = str(path), offset, detail

    def __str__(self) -> str:
        return f"{self.path}: damaged at byte {self.offset}: {self.detail}; fetch or copy the file again"


# --- planning -------------------------------------------------------------------------------
def _suffix_kind(path: Path) -> str | None:
    name = path.name.lower()
    for ext, kind in ((".jsonl.gz", "jsonl.gz"), (".jsonl.zst", "jsonl.zst"), (".jsonl", "jsonl"), (".parquet", "parquet")):
        if name.endswith(ext):
            return kind
    return TEXT_SUFFIXES.get(path.suffix.lower())


def expand_paths(patterns: list[str], resolve=lambda p: Path(p)) -> list[Path]:
    """Files named by paths, folders (walked) and globs, sorted; a pattern matching nothing is an error."""
    out: list[Path] = []
    for pattern in patterns:
        resolved = resolve(pattern)
        matches = sorted(glob.glob(str(resolved), recursive=True))
        if not matches:
            raise UserError(f"{pattern}: no such file or folder (looked for {resolved}); fix the path or glob")
        for m in map(Path, matches):
            if m.is_dir():
                found = sorted(p for p in m.rglob("*") if p.is_file() and _suffix_kind(p))
                if not found:
                    raise UserError(f"{m}: folder holds no readable files ({SUPPORTED})")
                out += found
            elif _suffix_kind(m) is None:
                raise UserError(f"{m}: unsupported file type; use one of {SUPPORTED}")
            else:
                out.append(m)
    return out


def stdlib_files() -> list[Path]:
    """The `.py` files of the running Python's standard library (installed packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if not ({"site-packages", "dist-packages"} & set(p.relative_to(root).parts)))


def _group_files(files: list[Path], source: str, first: int, unit_bytes: int) -> list[WorkUnit]:
    units, group, size = [], [], 0
    for f in files:
        group.append(str(f))
        size += f.stat().st_size
        if size >= unit_bytes:
            units.append(WorkUnit(first + len(units), source, "files", files=tuple(group), size=size))
            group, size = [], 0
    if group:
        units.append(WorkUnit(first + len(units), source, "files", files=tuple(group), size=size))
    return units


def _load_hub(source: Source, streaming: bool | None = None):
    import datasets  # seconds to import, and only hub sources need it

    streaming = source.streaming if streaming is None else streaming
    try:
        return datasets.load_dataset(source.hub, source.config, split=source.split, streaming=streaming,
                                     revision=source.revision)
    except Exception as exc:  # network, auth, missing config/split: all surface as one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"source '{source.name}': hub dataset {source.hub}"
            f"{f' (config {source.config})' if source.config else ''} split {source.split} is unreachable: {first[:300]}; "
            "check the name, config and network (or HF_TOKEN for gated data), or use a local path"
        ) from None


def pin_revision(source: Source) -> Source:
    """A hub source pinned to the commit its revision (default: the main branch) resolves to now, so
    that every work unit, on any node and after any restart, reads the same data; the commit is
    what the manifest records. Other sources, and hub datasets that are local folders, as they are."""
    if source.hub is None or Path(source.hub).exists():
        return source
    from huggingface_hub import HfApi

    try:
        sha = HfApi().dataset_info(source.hub, revision=source.revision).sha
    except Exception as exc:  # offline, unknown name or revision, gated: one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"source '{source.name}': cannot resolve revision {source.revision or 'main'} of hub dataset "
                        f"{source.hub}: {first[:300]}; check the name, revision and network (or HF_TOKEN)") from None
    if source.revision not in (None, sha):
        log.info("source '%s': %s revision %s is commit %s", source.name, source.hub, source.revision, sha)
    return source.model_copy(update={"revision": sha})


def plan_source(source: Source, first: int, unit_bytes: int, resolve=lambda p: Path(p)) -> list[WorkUnit]:
    """The work units of one source, numbered from `first`."""
    if source.hub is not None:
        ds = _load_hub(source)
        if source.streaming:
            n = max(1, getattr(ds, "n_shards", 1) or 1)
            return [WorkUnit(first + i, source.name, "hub", source.hub, i, n) for i in range(n)]
        rows = len(ds)
        return [WorkUnit(first + i, source.name, "hub", source.hub, lo, min(lo + HUB_ROWS, rows))
                for i, lo in enumerate(range(0, max(rows, 1), HUB_ROWS))]
    files = stdlib_files() if source.stdlib else expand_paths(source.paths(), resolve)
    units: list[WorkUnit] = []
    loose: list[Path] = []
    for f in files:
        kind = _suffix_kind(f)
        if kind in TEXT_SUFFIXES.values():
            loose.append(f)
            continue
        if loose:
            units += _group_files(loose, source.name, first + len(units), unit_bytes)
            loose = []
        size = f.stat().st_size
        if kind == "jsonl":
            for lo in range(0, max(size, 1), unit_bytes):
                units.append(WorkUnit(first + len(units), source.name, kind, str(f), lo, min(lo + unit_bytes, size),
                                      size=min(unit_bytes, size - lo)))
        elif kind == "parquet":
            try:
                groups = _parquet_file(f).num_row_groups
            except DamagedFile:
                # One unit whose reading raises the error again, so that data.on_error decides
                # about it where it decides about every other damaged file.
                units.append(WorkUnit(first + len(units), source.name, kind, str(f), 0, 0, size=size))
                continue
            for g in range(groups):
                units.append(WorkUnit(first + len(units), source.name, kind, str(f), g, g + 1, size=size // max(groups, 1)))
        else:
            units.append(WorkUnit(first + len(units), source.name, kind, str(f), size=size))
    if loose:
        units += _group_files(loose, source.name, first + len(units), unit_bytes)
    return units


# --- reading --------------------------------------------------------------------------------
class _Records:
    """Turns raw records into Docs/Skips with the source's field rules."""

    def __init__(self, source: Source):
        self.field = source.text_field
        self.language = source.language

    def from_record(self, rec, where: str) -> Doc | Skip | None:
        if not isinstance(rec, dict):
            return Skip("malformed_json", where)
        text = rec.get(self.field)
        if not isinstance(text, str):
            return Skip("missing_field", where)
        if self.language is not None and rec.get("lang", self.language) != self.language:
            return None  # another language of a multilingual file: not ours, not an error
        if not text.strip():
            return Skip("empty", where, len(text))
        return Doc(text)


def _line_reader(stream, path: str, first_line: int, records: _Records, stop_after: int | None = None
                 ) -> Iterator[Doc | Skip]:
    """Parse jsonl lines; `stop_after` bounds the bytes read (byte-range units)."""
    line_no, consumed = first_line, 0
    for line in stream:
        if stop_after is not None and consumed >= stop_after:
            break
        consumed += len(line)
        line_no += 1
        if not line.strip():
            continue
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                yield Skip("invalid_utf8", f"{path}:{line_no}", len(line))
                continue
            yield Skip("malformed_json", f"{path}:{line_no}", len(line))
            continue
        out = records.from_record(rec, f"{path}:{line_no}")
        if out is not None:
            yield out


def _count_lines_before(path: str, offset: int) -> int:
    n = 0
    with open(path, "rb") as f:
        left = offset
        while left > 0:
            block = f.read(min(left, 16 << 20))
            if not block:
                break
            n += block.count(b"\n")
            left -= len(block)
    return n


def _read_jsonl_range(unit: WorkUnit, records: _Records) -> Iterator[Doc | Skip]:
    with open(unit.path, "rb") as f:
        start = unit.start
        if start > 0:
            # The line straddling `start` belongs to the previous unit.
            f.seek(start - 1)
            if f.read(1) != b"\n":
                start += len(f.readline())
        if start >= unit.stop and unit.stop > 0:
            return
        f.seek(start)
        # Line numbers are only needed for messages; counting them costs one pass over the
        # prefix, so the base is computed only once a bad line has been seen.
        base: int | None = 0 if start == 0 else None
        for item in _line_reader(f, unit.path, 0, records, stop_after=unit.stop - start):
            if isinstance(item, Skip):
                if base is None:
                    base = _count_lines_before(unit.path, start)
                p, n = item.where.rsplit(":", 1)
                item.where = f"{p}:{int(n) + base}"
            yield item


class _Decompressed(io.RawIOBase):
    """The decompressed bytes of every gzip member or zstd frame of a file, one after the other.

    The input must end where a member or frame ends: zstandard's stream reader takes a frame cut
    short for the end of the data, so the members and frames are decoded here with the
    decompressors' own `eof`, and a cut or corrupt one raises DamagedFile with its byte offset.
    """

    READ = 1 << 17

    def __init__(self, path: str | Path, fmt: str):
        super().__init__()
        self.path, self.fmt = str(path), fmt
        self.raw = open(path, "rb")
        self.decoder = None        # of the member or frame being read; None between them
        self.pending = b""         # input after the end of the last member or frame
        self.out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while not self.out:
            if not self._decode_more():
                return 0
        n = min(len(buf), len(self.out))
        buf[:n] = self.out[:n]
        self.out = self.out[n:]
        return n

    def _next_input(self) -> tuple[int, bytes]:
        """The next block of input and its offset in the file."""
        while True:
            start = self.raw.tell() - len(self.pending)
            data, self.pending = self.pending or self.raw.read(self.READ), b""
            if self.fmt == "gzip" and self.decoder is None and start > 0:
                # zero padding after a member, which Python's gzip module accepts too
                kept = data.lstrip(b"\0")
                if data and not kept:
                    continue
                start, data = start + len(data) - len(kept), kept
            return start, data

    def _decode_more(self) -> bool:
        """Decodes the next block of input into `out`; False at the end of the last member or frame."""
        start, data = self._next_input()
        if not data:
            if self.decoder is not None:
                unit = "member" if self.fmt == "gzip" else "frame"
                raise DamagedFile(self.path, self.raw.tell(), f"the file ends inside a {self.fmt} {unit} (cut short?)")
            return False
        if self.decoder is None:
            self.decoder = (zlib.decompressobj(16 + zlib.MAX_WBITS) if self.fmt == "gzip"
                            else zstandard.ZstdDecompressor().decompressobj())
        try:
            self.out = memoryview(self.decoder.decompress(data))
        except (zlib.error, zstandard.ZstdError) as exc:
            raise DamagedFile(self.path, start, f"corrupt {self.fmt} data in the next {len(data)} bytes ({exc})") from None
        if self.decoder.eof:
            self.pending, self.decoder = self.decoder.unused_data, None
        return True

    def close(self) -> None:
        self.raw.close()
        super().close()


def open_binary(path: str | Path):
    """A file as a binary stream, decompressed by its suffix (.gz, .zst); shared by every reader of local files."""
    if str(path).endswith(".gz"):
        return io.BufferedReader(_Decompressed(path, "gzip"), _Decompressed.READ)
    if str(path).endswith(".zst"):
        return io.BufferedReader(_Decompressed(path, "zstd"), _Decompressed.READ)
    return open(path, "rb")


def html_to_text(raw: bytes) -> str:
    """The visible text of an HTML page: scripts, styles and markup dropped, one block per line."""
    import lxml.html  # only folders of HTML need lxml

    try:
        root = lxml.html.fromstring(raw)
    except Exception:  # lxml raises ParserError on empty or markup-free input
        return ""
    for bad in root.xpath("//script|//style|//noscript|//template"):
        bad.drop_tree()
    for block in root.iter(*HTML_BLOCKS):  # block elements end a line of text
        block.tail = "\n" + (block.tail or "")
    lines = (" ".join(line.split()) for line in root.text_content().splitlines())
    return "\n".join(line for line in lines if line)


def _read_files(unit: WorkUnit, records: _Records) -> Iterator[Doc | Skip]:
    for path in unit.files:
        raw = Path(path).read_bytes()
        kind = TEXT_SUFFIXES[Path(path).suffix.lower()]
        if kind == "html":
            text = html_to_text(raw)
        else:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield Skip("invalid_utf8", path, len(raw))
                continue
        yield Doc(text) if text.strip() else Skip("empty", path, len(text))


def _parquet_file(path: str | Path):
    """A parquet file opened on its footer (the schema and row groups, written last)."""
    import pyarrow as pa  # only parquet sources need pyarrow
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except pa.ArrowInvalid as exc:  # no footer magic, or too short to hold one
        raise DamagedFile(path, os.path.getsize(path), f"no parquet footer at the end ({exc})") from None


def _utf8_or_none(raw: bytes | None) -> str | None:
    try:
        return None if raw is None else raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _column(table, name: str) -> tuple[list, set[int]]:
    """A column's values and the rows whose string is not UTF-8 (pyarrow reads such bytes, then
    fails on the whole column when converting it)."""
    import pyarrow as pa

    col = table.column(name)
    try:
        return col.to_pylist(), set()
    except UnicodeDecodeError:
        raw = col.cast(pa.large_binary()).to_pylist()
        values = [_utf8_or_none(v) for v in raw]
        return values, {i for i, (v, r) in enumerate(zip(values, raw)) if v is None and r is not None}


def _read_parquet(unit: WorkUnit, records: _Records) -> Iterator[Doc | Skip]:
    import pyarrow as pa

    pf = _parquet_file(unit.path)
    names = set(pf.schema_arrow.names)
    columns = [c for c in (records.field, "lang") if c in names]
    try:
        table = pf.read_row_group(unit.start, columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:  # pyarrow raises OSError for pages that do not decode
        chunk = pf.metadata.row_group(unit.start).column(0)
        raise DamagedFile(unit.path, chunk.dictionary_page_offset or chunk.data_page_offset,
                          f"row group {unit.start} does not decode ({str(exc).strip().splitlines()[0]})") from None
    row0 = sum(pf.metadata.row_group(g).num_rows for g in range(unit.start))
    if records.field not in names:
        for i in range(table.num_rows):
            yield Skip("missing_field", f"{unit.path}:row {row0 + i}")
        return
    cols, not_utf8 = {}, set()
    for c in columns:
        cols[c], bad = _column(table, c)
        not_utf8 |= bad
    for i in range(table.num_rows):
        where = f"{unit.path}:row {row0 + i}"
        if i in not_utf8:
            yield Skip("invalid_utf8", where)
            continue
        out = records.from_record({c: v[i] for c, v in cols.items()}, where)
        if out is not None:
            yield out


def _read_hub(unit: WorkUnit, source: Source, records: _Records) -> Iterator[Doc | Skip]:
    ds = _load_hub(source)
    if source.streaming:
        if unit.stop > 1:
            ds = ds.shard(num_shards=unit.stop, index=unit.start)
        rows = iter(ds)
        offset = 0
    else:
        rows = iter(ds.select(range(unit.start, unit.stop)))
        offset = unit.start
    for i, rec in enumerate(rows):
        out = records.from_record(rec, f"{source.hub}:shard {unit.start} row {offset + i}" if source.streaming
                                  else f"{source.hub}:row {offset + i}")
        if out is not None:
            yield out


def read_unit(unit: WorkUnit, source: Source) -> Iterator[Doc | Skip]:
    """Documents and skipped records of one work unit, in file order."""
    records = _Records(source)
    if unit.kind == "jsonl":
        yield from _read_jsonl_range(unit, records)
    elif unit.kind in ("jsonl.gz", "jsonl.zst"):
        with open_binary(unit.path) as stream:
            yield from _line_reader(stream, unit.path, 0, records)
    elif unit.kind == "parquet":
        yield from _read_parquet(unit, records)
    elif unit.kind == "files":
        yield from _read_files(unit, records)
    elif unit.kind == "hub":
        yield from _read_hub(unit, source, records)
    else:  # pragma: no cover - plans are made by plan_source
        raise ValueError(f"unknown work unit kind {unit.kind}")


def input_signature(units: list[WorkUnit]) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of every local input file: a changed input invalidates cached units."""
    seen: dict[str, tuple[str, int, int]] = {}
    for u in units:
        for p in (u.files or ((u.path,) if u.kind != "hub" else ())):
            if p not in seen:
                st = os.stat(p)
                seen[p] = (p, st.st_size, int(st.st_mtime_ns))
    return list(seen.values())
