"""Scaling of the data stage (zagreus.data.stage.tokenize_data) with the corpus size.

The handbook (../shared/data/handbook-5lang.jsonl) is replicated into a temporary folder of 8
jsonl files (field "text") until the corpus reaches each of --sizes megabytes. Copy k of a page
starts with a line "[copy k]" and, for k >= 1, has its words shuffled (every whitespace run kept
in place, same bytes): a unique first line alone makes copies distinct for exact dedup, but
MinHash would still see them as near duplicates of copy 0. Planted among them, spread over the
files and always in a later file (so another work unit) than their original:

  ~2% exact duplicates  an earlier document again, as is, lower-cased or with extra whitespace
                        (equal after the exact-dedup normalisation)
  ~2% near duplicates   an earlier document (>= 100 words) with ~1% of its words replaced

Every (size, mode) runs tokenize_data once in a fresh process (this script with --one), Llama-3
tokenizer, local executor with 2 workers, default 4 MB work units, validation_fraction 0.01,
filters {min_chars: 0, max_chars: null, quality: false} and dedup none or minhash. For each run:

  * tokens (train + val), wall seconds of tokenize_data, seconds per million tokens
  * peak RSS of every process of the run (the driver and every worker it forks), sampled with
    psutil every 0.05 s; getrusage's ru_maxrss (driver, largest reaped child) as a cross-check
  * disk: all bytes under the output folder at the end / bytes of the final shards (*.ds,
    *.ds.index, *.ds.metadata under train/ and val/); the peak during the run is shown as info
  * serial share: wall seconds of the single-task phases (manifest "phases", tasks == 1) over
    the wall seconds of all phases
  * minhash runs: the manifest's removal counts (exact_dedup, minhash_dedup) next to the planted
    duplicates; the handbook holds a few near-duplicate pages of its own (3, all in copy 0), so
    minhash_dedup may exceed the planted near duplicates by up to that many

    .venv/bin/python benchmarks/data_scale.py [--sizes 50 200 800] [--modes none minhash]
                                              [--keep] [--workdir DIR] [--json PATH]

Targets (PASS/FAIL per mode; the script exits 0 either way, it is a report):
  s per M tokens flat: max/min over the sizes <= 1.2 (two-sided: a fixed start-up that the
    larger sizes amortise fails it too; the marginal s/Mtok between sizes and the implied fixed
    start-up are printed beside it)
  s per M tokens does not grow: largest corpus / smallest corpus <= 1.2
  peak RSS flat: max over all processes, largest corpus / smallest corpus <= 1.2
  disk / shards <= 1.1 at every size
  serial share <= 5% at the largest size
Tiny --sizes (a few MB) only check that the script works: fixed start-up costs dominate them.
"""

from __future__ import annotations

from pathlib import Path

import argparse
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HANDBOOK = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "handbook-5lang.jsonl"
FILES = 8
SEED = 20240611
DUP_FRACTION = 0.02  # of all documents, for each of the two kinds of planted duplicate
NEAR_REPLACED = 0.01  # of the words of a near duplicate
NEAR_MIN_WORDS = 100  # shorter originals: one replaced word would already be too much for MinHash's 0.8
SAMPLE_S = 0.05
DISK_SAMPLE_S = 0.5
TARGETS = {"s_per_mtok": 1.2, "rss": 1.2, "disk": 1.1, "serial": 0.05}
MB = 1e6
SHARD_SUFFIXES = (".ds", ".ds.index", ".ds.metadata")


# --- corpus ---------------------------------------------------------------------------------
class Pages:
    """The handbook's pages, split once into words and the whitespace between them, so that any
    base document (copy k of page j, k = i // pages, j = i % pages) can be rebuilt from its index
    alone: the corpus is written streaming, planted duplicates regenerate their original."""

    def __init__(self) -> None:
        import numpy as np

        self.np = np
        texts = [json.loads(line)["text"] for line in HANDBOOK.open(encoding="utf-8")]
        self.parts = [np.array(re.split(r"(\s+)", t), dtype=object) for t in texts]
        # Positions of the non-empty words (parts has words at even, whitespace at odd indices;
        # a leading/trailing empty word stays put so no whitespace runs merge).
        self.slots = [np.array([i for i in range(0, len(p), 2) if p[i]]) for p in self.parts]
        self.words = [len(s) for s in self.slots]
        self.nbytes = [len(t.encode("utf-8")) for t in texts]
        self.count = len(texts)

    def prefix(self, i: int) -> str:
        return f"[copy {i // self.count}]\n"

    def size(self, i: int) -> int:
        # Shuffling moves words only: a copy has its page's bytes plus its first line.
        return self.nbytes[i % self.count] + len(self.prefix(i))

    def text(self, i: int) -> str:
        k, j = divmod(i, self.count)
        parts = self.parts[j]
        if k:
            parts = parts.copy()
            slots = self.slots[j]
            parts[slots] = parts[self.np.random.default_rng((SEED, i)).permutation(slots)]
        return self.prefix(i) + "".join(parts.tolist())


def exact_variant(text: str, rng: random.Random) -> str:
    """The same text after filters.normalise (lower case, whitespace runs collapsed): as is,
    lower-cased, or with spaces doubled and a trailing newline."""
    kind = rng.randrange(3)
    if kind == 1:
        return text.lower()
    if kind == 2:
        return text.replace(" ", "  ", rng.randint(1, 50)) + "\n"
    return text


def near_variant(text: str, rng: random.Random) -> str:
    """`text` with ~1% of its words (at least one) replaced by another word of the same text."""
    parts = re.split(r"(\s+)", text)
    slots = [i for i in range(0, len(parts), 2) if parts[i]]
    for i in rng.sample(slots, max(1, round(NEAR_REPLACED * len(slots)))):
        for _ in range(100):  # another word, not the same one in another case
            word = parts[rng.choice(slots)]
            if word.lower() != parts[i].lower():
                break
        else:
            word = parts[i] + "x"
        parts[i] = word
    return "".join(parts)


def make_corpus(folder: Path, mb: float, pages: Pages) -> dict:
    """Writes FILES jsonl files of about `mb` MB in all, with planted duplicates; returns their counts."""
    rng = random.Random(SEED)
    # Base documents fill (1 - 2 * DUP_FRACTION) of the bytes; the planted ones, the rest on average.
    base_bytes, n = 0, 0
    while base_bytes < mb * MB * (1 - 2 * DUP_FRACTION) or n < FILES:
        base_bytes += pages.size(n)
        n += 1
    first = [f * n // FILES for f in range(FILES + 1)]  # base documents first[f]:first[f + 1] go to file f
    per_kind = round(DUP_FRACTION * n / (1 - 2 * DUP_FRACTION))
    # Originals come from files 0..6 and their duplicate goes to a later file (another work unit,
    # later in plan order: finalize keeps a document's first occurrence).
    pool = list(range(first[FILES - 1]))
    long_pool = [i for i in pool if pages.words[i % pages.count] >= NEAR_MIN_WORDS]
    exact_orig = rng.sample(pool, min(per_kind, len(pool)))
    taken = set(exact_orig)
    candidates = [i for i in long_pool if i not in taken]
    near_orig = rng.sample(candidates, min(per_kind, len(candidates)))
    inserts: dict[int, list[tuple[int, str, int]]] = {f: [] for f in range(FILES)}
    for kind, originals in (("exact", exact_orig), ("near", near_orig)):
        for orig in originals:
            f_orig = next(f for f in range(FILES) if first[f] <= orig < first[f + 1])
            f = rng.randint(f_orig + 1, FILES - 1)
            inserts[f].append((rng.randint(first[f], first[f + 1]), kind, orig))  # before base document that index
    docs = 0
    for f in range(FILES):
        planted = sorted(inserts[f])
        with open(folder / f"part-{f:02d}.jsonl", "w", encoding="utf-8") as out:
            p = 0
            for i in range(first[f], first[f + 1] + 1):
                while p < len(planted) and planted[p][0] == i:
                    _, kind, orig = planted[p]
                    doc_rng = random.Random(f"{SEED}-{kind}-{orig}")
                    text = pages.text(orig)
                    text = exact_variant(text, doc_rng) if kind == "exact" else near_variant(text, doc_rng)
                    out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                    p += 1
                    docs += 1
                if i < first[f + 1]:
                    out.write(json.dumps({"text": pages.text(i)}, ensure_ascii=False) + "\n")
                    docs += 1
    return {"docs": docs, "base_docs": n, "planted_exact": len(exact_orig), "planted_near": len(near_orig),
            "bytes": sum(p.stat().st_size for p in folder.glob("*.jsonl"))}


# --- one run, in its own process ------------------------------------------------------------
def run_one(corpus: Path, out_dir: Path, mode: str, result: Path) -> None:
    """The child: one tokenize_data, its result as JSON in `result`."""
    import logging

    from zagreus.data.stage import tokenize_data
    from zagreus.recipe import DataSection, TokenizerSection

    logging.basicConfig(level=logging.WARNING)
    files = sorted(corpus.glob("*.jsonl"))
    data = DataSection(sources=[{"name": "web", "path": [str(p) for p in files]}],
                       filters={"min_chars": 0, "max_chars": None, "quality": False, "dedup": mode},
                       validation_fraction=0.01, executor={"kind": "local", "workers": 2})
    t0 = time.perf_counter()
    manifest = tokenize_data(data, out_dir, TokenizerSection(kind="llama3"), show_progress=False)
    wall = time.perf_counter() - t0
    result.write_text(json.dumps({
        "wall_s": wall,
        "totals": manifest["totals"],
        "phases": manifest["phases"],
        "source": manifest["sources"]["web"],
        # Linux: kilobytes. CHILDREN is the largest reaped descendant (the pool's workers).
        "ru_maxrss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "ru_maxrss_children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }))


def tree_bytes(folder: Path) -> int:
    """All file bytes under `folder`, hidden folders included; tolerates files vanishing meanwhile."""
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def shard_bytes(out_dir: Path) -> int:
    return sum(p.stat().st_size for split in ("train", "val") if (out_dir / split).is_dir()
               for p in (out_dir / split).rglob("*") if p.is_file() and p.name.endswith(SHARD_SUFFIXES))


def measure(corpus: Path, out_dir: Path, mode: str) -> dict:
    """Runs the child and samples the RSS of its whole process tree (and the output's size) meanwhile."""
    import psutil

    result = out_dir.parent / f"{out_dir.name}.result.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", "--corpus", str(corpus), "--out", str(out_dir),
           "--mode", mode, "--result", str(result)]
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd)
    driver = psutil.Process(child.pid)
    peaks: dict[int, int] = {}
    disk_peak, next_disk = 0, 0.0
    while child.poll() is None:
        try:
            procs = [driver, *driver.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in procs:
            try:
                rss = p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            peaks[p.pid] = max(peaks.get(p.pid, 0), rss)
        if time.perf_counter() >= next_disk and out_dir.exists():  # walking the folder costs more: less often
            disk_peak = max(disk_peak, tree_bytes(out_dir))
            next_disk = time.perf_counter() + DISK_SAMPLE_S
        time.sleep(SAMPLE_S)
    rc = child.wait()
    process_s = time.perf_counter() - t0
    if rc != 0 or not result.is_file():
        return {"error": f"the run exited with status {rc} (its output is above)", "process_s": process_s}
    run = json.loads(result.read_text())
    result.unlink()
    tokens = run["totals"]["train"]["tokens"] + run["totals"]["val"]["tokens"]
    disk, shards = tree_bytes(out_dir), shard_bytes(out_dir)
    phases = run["phases"]
    wall_phases = sum(p["wall_s"] for p in phases.values())
    workers = {pid: rss for pid, rss in peaks.items() if pid != child.pid}
    return {
        **run,
        "process_s": process_s,
        "tokens": tokens,
        "s_per_mtok": run["wall_s"] / (tokens / 1e6) if tokens else float("nan"),
        "rss_driver": peaks.get(child.pid, 0),
        "rss_max": max(peaks.values(), default=0),
        "rss_max_worker": max(workers.values(), default=0),
        "processes": len(peaks),
        "rss_by_pid": {str(pid): rss for pid, rss in sorted(peaks.items())},
        "disk_bytes": disk,
        "shard_bytes": shards,
        "disk_ratio": disk / shards if shards else float("inf"),
        "disk_peak_ratio": max(disk_peak, disk) / shards if shards else float("inf"),
        "serial_share": sum(p["wall_s"] for p in phases.values() if p["tasks"] == 1) / wall_phases
        if wall_phases else float("nan"),
    }


# --- report ---------------------------------------------------------------------------------
def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def report_run(size: float, mode: str, corpus: dict, r: dict) -> None:
    print(f"== {size:g} MB, dedup {mode}")
    if "error" in r:
        print(f"  FAILED: {r['error']}")
        return
    t = r["totals"]
    print(f"  tokens {r['tokens']:,} (train {t['train']['tokens']:,} + val {t['val']['tokens']:,}); "
          f"wall {r['wall_s']:.2f} s (process {r['process_s']:.2f} s); {r['s_per_mtok']:.3f} s per M tokens")
    print(f"  peak RSS: driver {mib(r['rss_driver'])}, largest worker {mib(r['rss_max_worker'])}, max over "
          f"{r['processes']} processes {mib(r['rss_max'])}; getrusage: driver {mib(r['ru_maxrss_self'])}, "
          f"largest reaped child {mib(r['ru_maxrss_children'])}")
    print(f"  disk: {r['disk_bytes'] / MB:.2f} MB under the output / {r['shard_bytes'] / MB:.2f} MB of shards = "
          f"{r['disk_ratio']:.3f} (target <= {TARGETS['disk']}); peak sampled during the run "
          f"{r['disk_peak_ratio']:.2f}x the shards (info)")
    phases = ", ".join(f"{name} {p['wall_s']:.2f} s ({p['tasks']} task{'s' if p['tasks'] != 1 else ''})"
                       for name, p in r["phases"].items())
    print(f"  phases: {phases}; serial share {100 * r['serial_share']:.1f}%")
    if mode == "minhash":
        removed = r["source"]["filters"]
        got = ", ".join(f"{k} {v['docs']:,} docs ({v['chars']:,} chars)" for k, v in removed.items()) or "none"
        print(f"  removed: {got}; planted: {corpus['planted_exact']:,} exact, {corpus['planted_near']:,} near")


def summarize(mode: str, rows: list[tuple[float, dict, dict]]) -> dict:
    """The table of one mode and its PASS/FAIL lines; returns the checks."""
    print(f"\n-- dedup {mode}")
    print(f"{'MB':>8} {'docs':>9} {'tokens':>13} {'wall s':>8} {'s/Mtok':>8} {'driver':>9} {'max proc':>9} "
          f"{'disk/shards':>11} {'serial':>7}")
    ok = [(size, corpus, r) for size, corpus, r in rows if "error" not in r]
    for size, corpus, r in rows:
        if "error" in r:
            print(f"{size:>8g}  FAILED")
            continue
        print(f"{size:>8g} {corpus['docs']:>9,} {r['tokens']:>13,} {r['wall_s']:>8.2f} {r['s_per_mtok']:>8.3f} "
              f"{mib(r['rss_driver']):>9} {mib(r['rss_max']):>9} {r['disk_ratio']:>11.3f} "
              f"{100 * r['serial_share']:>6.1f}%")
    if len(ok) < 2:
        print("fewer than two successful sizes: no scaling checks")
        return {}
    small, large = ok[0][2], ok[-1][2]  # sizes are sorted
    rate = [r["s_per_mtok"] for _, _, r in ok]
    spread = max(rate) / min(rate)
    rss = large["rss_max"] / small["rss_max"]
    print(f"largest/smallest: s/Mtok {large['s_per_mtok'] / small['s_per_mtok']:.3f} (max/min over sizes "
          f"{spread:.3f}), max process RSS {rss:.3f}, driver RSS {large['rss_driver'] / small['rss_driver']:.3f}, "
          f"largest worker RSS {large['rss_max_worker'] / max(small['rss_max_worker'], 1):.3f}")
    # Where s/Mtok falls with size, a fixed start-up (per process: imports, tokenizer engines) is
    # being amortised; the marginal cost between sizes is the per-token cost without it.
    marginal = [(b["wall_s"] - a["wall_s"]) / max(b["tokens"] - a["tokens"], 1) * 1e6
                for (_, _, a), (_, _, b) in zip(ok, ok[1:])]
    fixed = ok[-1][2]["wall_s"] - marginal[-1] * ok[-1][2]["tokens"] / 1e6
    print("marginal s/Mtok " + ", ".join(f"{ok[i][0]:g}->{ok[i + 1][0]:g} MB {m:.3f}" for i, m in enumerate(marginal))
          + f"; fixed start-up implied by the two largest sizes {fixed:.2f} s")
    growth = large["s_per_mtok"] / small["s_per_mtok"]
    worst_disk = max(r["disk_ratio"] for _, _, r in ok)
    checks = {
        "s_per_mtok_no_growth": (growth <= TARGETS["s_per_mtok"],
                                 f"s per M tokens does not grow: {ok[-1][0]:g} MB / {ok[0][0]:g} MB = {growth:.3f} "
                                 f"(target <= {TARGETS['s_per_mtok']})"),
        "s_per_mtok_flat": (spread <= TARGETS["s_per_mtok"],
                            f"s per M tokens flat: max/min over sizes {spread:.3f} "
                            f"(target <= {TARGETS['s_per_mtok']})"),
        "rss_flat": (rss <= TARGETS["rss"],
                     f"peak RSS flat: max over processes, {ok[-1][0]:g} MB / {ok[0][0]:g} MB = {rss:.3f} "
                     f"(target <= {TARGETS['rss']})"),
        "disk": (worst_disk <= TARGETS["disk"],
                 f"disk / shards at every size: worst {worst_disk:.3f} (target <= {TARGETS['disk']})"),
        "serial": (large["serial_share"] <= TARGETS["serial"],
                   f"serial share at {ok[-1][0]:g} MB: {100 * large['serial_share']:.1f}% "
                   f"(target <= {100 * TARGETS['serial']:.0f}%)"),
    }
    for passed, line in checks.values():
        print(f"{'PASS' if passed else 'FAIL'}  [{mode}] {line}")
    return {name: {"pass": passed, "line": line} for name, (passed, line) in checks.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[50.0, 200.0, 800.0], help="corpus sizes, MB")
    ap.add_argument("--modes", nargs="+", choices=["none", "minhash"], default=["none", "minhash"])
    ap.add_argument("--keep", action="store_true", help="keep the corpora and outputs")
    ap.add_argument("--workdir", type=Path, help="where corpora and outputs go (default: a new folder in /tmp)")
    ap.add_argument("--json", type=Path, help="write every result here")
    # The child's side (internal): one run of the stage, in a fresh process.
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        run_one(args.corpus, args.out, args.mode, args.result)
        return

    sizes = sorted(args.sizes)
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="zagreus-bench-scale-", dir="/tmp")) if own_workdir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"sizes {', '.join(f'{s:g}' for s in sizes)} MB; modes {', '.join(args.modes)}; workdir {workdir}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    pages = Pages()
    results: list[dict] = []
    try:
        for size in sizes:
            corpus_dir = workdir / f"corpus-{size:g}mb"
            shutil.rmtree(corpus_dir, ignore_errors=True)
            corpus_dir.mkdir()
            t0 = time.perf_counter()
            corpus = make_corpus(corpus_dir, size, pages)
            print(f"\ncorpus {size:g} MB: {corpus['docs']:,} documents, {corpus['bytes'] / MB:.1f} MB in {FILES} "
                  f"files, planted {corpus['planted_exact']:,} exact + {corpus['planted_near']:,} near duplicates "
                  f"({time.perf_counter() - t0:.1f} s to write)")
            for mode in args.modes:
                out_dir = workdir / f"out-{size:g}mb-{mode}"
                shutil.rmtree(out_dir, ignore_errors=True)  # a leftover manifest would make the run a no-op
                r = measure(corpus_dir, out_dir, mode)
                report_run(size, mode, corpus, r)
                results.append({"size_mb": size, "mode": mode, "corpus": corpus, **r})
                if not args.keep:
                    shutil.rmtree(out_dir, ignore_errors=True)
            if not args.keep:
                shutil.rmtree(corpus_dir, ignore_errors=True)  # bounded disk: one corpus at a time
        print(f"\nload average after: {os.getloadavg()[0]:.2f}")
        checks = {}
        for mode in args.modes:
            rows = [(r["size_mb"], r["corpus"], r) for r in results if r["mode"] == mode]
            checks[mode] = summarize(mode, rows)
        if args.json:
            args.json.write_text(json.dumps({"sizes_mb": sizes, "modes": args.modes, "targets": TARGETS,
                                             "results": results, "checks": checks}, indent=2) + "\n")
            print(f"wrote {args.json}")
    finally:
        if args.keep:
            print(f"kept {workdir}")
        elif own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
