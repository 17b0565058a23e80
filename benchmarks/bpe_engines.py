"""Llama-3 BPE engines from PyPI against tiktoken: identical ids, then speed (issue 12).

    python benchmarks/bpe_engines.py [--threads 2] [--repeat 3]

Engines (each skipped, with the reason printed, when not installed or when it cannot load the
Llama-3 vocabulary: the 128,000 ranks of llama-models' tokenizer.model and LLAMA3_PATTERN):

  tiktoken    the reference: tiktoken.Encoding over the llama-models ranks, as zagreus builds it
  bpe-openai  its Rust backend only ships cl100k_base / o200k_base / voyage3_base (no custom ranks)
  fastokens   Tokenizer.from_json_str of our tokenizer.json export (Tokenizer.to_hf, post-processor
              dropped so no BOS is added); its from_tiktoken is tried first and its error printed
  kitoken     Kitoken.from_tiktoken_file of the llama-models file, then its split regex set to
              LLAMA3_PATTERN (it guesses cl100k's) and its special tokens removed (it cuts text at
              special-token strings even when they are not encoded as specials)

Identity: every engine's ids must equal tiktoken's encode_ordinary (special-token strings are
text, as in zagreus' encode without allow_special) on each whole handbook document
(../shared/data/handbook-5lang.jsonl, 635 documents), on the HARD_STRINGS of
tests/test_tokenizer.py, on a few long pathological strings (STRESS) and on the handbook with each
document reversed (text no engine has seen), single and batch APIs, each check on a fresh engine.
Mismatch counts and the first mismatch are printed.

Speed on the whole handbook, best of --repeat, wall time and CPU time (the machine may be shared),
each run on a fresh engine whose making is not timed (fastokens caches the ids of words it has
seen: a second pass over the same 6 MB is about 3x faster, which a real corpus does not get):
  single  one document at a time: tiktoken encode_ordinary, fastokens encode_ordinary(..).ids,
          kitoken encode
  batch   all documents in one call on --threads threads: tiktoken encode_ordinary_batch
          (num_threads), fastokens encode_batch(split_special_tokens=True) -> .ids and kitoken
          encode_all, both on rayon with RAYON_NUM_THREADS=--threads (set before they are imported)

An engine is adopted only if identical on everything and at least --margin (1.2) times tiktoken's
tokens/s in both modes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HANDBOOK = ROOT / ".." / "shared" / "data" / "handbook-5lang.jsonl"

STRESS = [
    "a" * 20_000,
    " " * 20_000 + "x",
    "\n" * 5_000 + "x" + "\r\n" * 3_000,
    "1" * 10_001,
    "é" * 10_000 + " " + "😀" * 2_000,
    ("ab " * 5_000).strip() + "\t" * 3_000,
]


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def load_engines(threads: int) -> tuple[dict, dict]:
    """name -> make(), which builds a fresh engine and returns (single(text) -> ids, batch(texts) -> list of
    ids); name -> why it was not loaded. Fresh, because fastokens caches the ids of the words it has seen."""
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # before fastokens / kitoken start their pools
    import tiktoken

    from zagreus.tokenizer import LLAMA3_PATTERN, llama3_model_path, load_tokenizer

    tok = load_tokenizer("llama3")
    model = str(llama3_model_path())

    def make_tiktoken():
        tt = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=tok._tt._mergeable_ranks, special_tokens={})
        return tt.encode_ordinary, lambda texts: tt.encode_ordinary_batch(texts, num_threads=threads)

    engines = {"tiktoken": make_tiktoken}
    skipped = {}

    try:
        import bpe_openai._bindings as bindings

        skipped["bpe-openai"] = (f"built-in encodings only {bindings.supported_encodings()}: no way to pass "
                                 "the Llama-3 ranks or pattern to its Rust backend")
    except ImportError as exc:
        skipped["bpe-openai"] = f"not importable ({exc})"

    try:
        import fastokens

        try:
            fastokens.Tokenizer.from_tiktoken(model, pattern=LLAMA3_PATTERN, special_tokens=tok.special_tokens)
            print("fastokens: from_tiktoken loaded (the tokenizer.json route is benchmarked)")
        except Exception as exc:  # noqa: BLE001 - report why and go on with tokenizer.json
            print(f"fastokens: from_tiktoken fails on the llama-models file: {exc}")
        t0 = time.perf_counter()
        hf = tok.to_hf()
        hf.post_processor = None  # no BOS: compare bare ids
        hf_json = hf.to_str()
        t1 = time.perf_counter()
        fastokens.Tokenizer.from_json_str(hf_json)
        print(f"fastokens: tokenizer.json from the ranks {t1 - t0:.1f} s (transformers' TikTokenConverter), "
              f"from_json_str {time.perf_counter() - t1:.1f} s")

        def make_fastokens():
            ft = fastokens.Tokenizer.from_json_str(hf_json)
            return (lambda text: ft.encode_ordinary(text).ids,
                    lambda texts: [e.ids for e in ft.encode_batch(texts, split_special_tokens=True)])

        engines["fastokens"] = make_fastokens
    except ImportError as exc:
        skipped["fastokens"] = f"not importable ({exc})"

    try:
        import kitoken

        def make_kitoken():
            kt = kitoken.Kitoken.from_tiktoken_file(model)
            definition = kt.definition()
            definition["config"]["split"] = [{"Pattern": {"pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolate"}}]
            definition["specials"] = []
            kt.set_definition(definition)
            return kt.encode, kt.encode_all

        engines["kitoken"] = make_kitoken
    except ImportError as exc:
        skipped["kitoken"] = f"not importable ({exc})"
    return engines, skipped


def first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_identity(name: str, make, docs: list[dict], want_docs, hard: list[str], reference) -> bool:
    same = True
    texts = [d["text"] for d in docs]
    for label, texts, want, mode in (
        ("handbook (single)", texts, want_docs, 0),
        ("handbook (batch)", texts, want_docs, 1),
        ("hard strings", hard, None, 0),
        ("hard (batch)", hard, None, 1),
        ("stress strings", STRESS, None, 0),
        ("reversed handbook", [t[::-1] for t in texts], None, 1),
    ):
        if want is None:
            want = [reference(t) for t in texts]
        single, batch = make()
        try:
            got = [single(t) for t in texts] if mode == 0 else batch(texts)
        except Exception as exc:  # noqa: BLE001 - an engine that raises is not identical
            print(f"  {name:10s} {label:18s} raised {type(exc).__name__}: {exc}")
            same = False
            continue
        bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
        print(f"  {name:10s} {label:18s} {len(bad)}/{len(texts)} mismatching")
        if bad:
            same = False
            i = bad[0]
            at = first_diff(got[i], want[i])
            where = docs[i]["id"] if "handbook" in label else repr(texts[i][:60])
            print(f"    first: {where}: token {at}: got {got[i][at:at + 6]} want {want[i][at:at + 6]}")
    return same


def best_of(repeat: int, make, mode: int, texts: list[str]) -> tuple[float, float, int]:
    """(wall, cpu, tokens) of the fastest of `repeat` runs, each on a fresh engine (not timed: its making)."""
    runs = []
    for _ in range(repeat):
        single, batch = make()
        fn = (lambda: [single(t) for t in texts]) if mode == 0 else (lambda: batch(texts))
        c0, t0 = time.process_time(), time.perf_counter()
        n = sum(map(len, fn()))
        runs.append((time.perf_counter() - t0, time.process_time() - c0, n))
    return min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--margin", type=float, default=1.2)
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    from test_tokenizer import HARD_STRINGS

    print("versions: " + ", ".join(f"{d} {version(d)}" for d in ("tiktoken", "bpe-openai", "fastokens", "kitoken")))
    t0 = time.perf_counter()
    engines, skipped = load_engines(args.threads)
    print(f"loaded in {time.perf_counter() - t0:.1f} s")
    for name, why in skipped.items():
        print(f"{name}: not benchmarked: {why}")

    docs = [json.loads(line) for line in HANDBOOK.open(encoding="utf-8")]
    texts = [d["text"] for d in docs]
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    tt_single, _ = engines["tiktoken"]()
    want_docs = [tt_single(t) for t in texts]
    print(f"handbook: {len(docs)} documents, {mb:.2f} MB, {sum(map(len, want_docs)):,} tokens (tiktoken)")

    print("\nidentity against tiktoken encode_ordinary:")
    identical = {name: check_identity(name, make, docs, want_docs, HARD_STRINGS, tt_single)
                 for name, make in engines.items() if name != "tiktoken"}

    print(f"\nspeed on the handbook, best of {args.repeat} (a fresh engine each), batch on {args.threads} threads:")
    rows = {name: {"single": best_of(args.repeat, make, 0, texts), "batch": best_of(args.repeat, make, 1, texts)}
            for name, make in engines.items()}
    ref = rows["tiktoken"]
    print("| engine | identical | single Mtok/s | vs tiktoken | batch Mtok/s | vs tiktoken | batch tok per CPU-s vs tiktoken |")
    print("|---|---|---|---|---|---|---|")
    adopt, adopt_ratio = None, 0.0
    for name, r in rows.items():
        ratio = {m: (r[m][2] / r[m][0]) / (ref[m][2] / ref[m][0]) for m in r}
        cpu_ratio = (r["batch"][2] / r["batch"][1]) / (ref["batch"][2] / ref["batch"][1])
        same = "reference" if name == "tiktoken" else ("yes" if identical[name] else "NO")
        print(f"| {name} | {same} | {r['single'][2] / r['single'][0] / 1e6:.2f} | {ratio['single']:.2f}x "
              f"| {r['batch'][2] / r['batch'][0] / 1e6:.2f} | {ratio['batch']:.2f}x | {cpu_ratio:.2f}x |")
        if name != "tiktoken" and identical[name] and min(ratio.values()) >= args.margin and min(ratio.values()) > adopt_ratio:
            adopt, adopt_ratio = name, min(ratio.values())
    for name in skipped:
        print(f"| {name} | not loaded | - | - | - | - | - |")
    if adopt:
        print(f"\nadopt: {adopt} (identical everywhere, {adopt_ratio:.2f}x tiktoken at least)")
    else:
        print(f"\nadopt: none (no engine is identical everywhere and {args.margin}x tiktoken in both modes)")


if __name__ == "__main__":
    main()
