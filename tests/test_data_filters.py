"""Filters: planted exact and near duplicates removed (and nothing else), language ID offline,
each quality rule, per-filter counts in the manifest."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from zagreus.data import shards
from zagreus.data.filters import MinHasher, band_keys, quality_reason
from zagreus.data.stage import tokenize_data
from zagreus.recipe import DataSection, TokenizerSection


def handbook(path: Path, lang: str, n: int) -> list[str]:
    docs = [json.loads(line) for line in path.open(encoding="utf-8")]
    return [d["text"] for d in docs if d["lang"] == lang][:n]


def change_words(text: str, every: int) -> str:
    words = text.split(" ")
    return " ".join("CHANGED" if i % every == every - 1 else w for i, w in enumerate(words))


def test_dedup_removes_planted_exact_and_near_duplicates_and_keeps_the_rest(tmp_path, handbook_path, llama3_tokenizer):
    distinct = [t for t in handbook(handbook_path, "en", 40) if len(t) > 3000][:12]
    exact_copy = "  " + distinct[0].upper().replace("\n", " \n ") + "\n"      # same after normalisation
    near_1 = change_words(distinct[1], 150)                                   # ~1% of words changed
    near_2 = distinct[2][: int(len(distinct[2]) * 0.97)]                      # last 3% cut
    far = change_words(distinct[3], 3)                                        # a third of the words changed
    planted = distinct[:4] + [exact_copy, near_1, far] + distinct[4:8] + [near_2] + distinct[8:]
    path = tmp_path / "dups.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in planted))
    kept_by = {}
    for dedup in ("exact", "minhash"):
        data = DataSection(sources=[{"name": "en", "path": str(path)}], filters={"min_chars": 1, "quality": False,
                           "dedup": dedup}, validation_fraction=0, unit_bytes=32 << 10)
        manifest = tokenize_data(data, tmp_path / dedup, TokenizerSection(kind="llama3"), show_progress=False)
        docs = []
        for ds in sorted((tmp_path / dedup / "train" / "en").glob("*.ds")):
            toks = np.asarray(shards.read_tokens(ds))
            docs += [llama3_tokenizer.decode(d[1:].tolist())
                     for d in np.split(toks, shards.read_document_ends(ds)[:-1].astype(np.int64))]
        kept_by[dedup] = (docs, manifest["sources"]["en"]["filters"])
    docs, filters = kept_by["exact"]
    assert docs == [t for t in planted if t is not exact_copy]
    assert filters == {"exact_dedup": {"docs": 1, "chars": len(exact_copy)}}
    docs, filters = kept_by["minhash"]
    assert docs == distinct[:4] + [far] + distinct[4:]
    assert filters == {"exact_dedup": {"docs": 1, "chars": len(exact_copy)},
                       "minhash_dedup": {"docs": 2, "chars": len(near_1) + len(near_2)}}


def test_minhash_estimates_jaccard_and_is_deterministic():
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in rng.integers(0, 5_000, 3000)]
    changed = [("x" if i % 10 == 0 else w) for i, w in enumerate(words)]  # ~40% of the 5-word shingles differ
    a, b = " ".join(words), " ".join(changed)
    h1, h2 = MinHasher(128, 5), MinHasher(128, 5)
    s1, s2 = h1.signature(a), h2.signature(b)
    assert np.array_equal(s1, h2.signature(a))  # same seed, same signature, in any process
    assert np.array_equal(s1, h1.signature("  " + a.upper() + "\n"))  # shingles of the normalised text
    grams = lambda ws: {" ".join(ws[i:i + 5]) for i in range(len(ws) - 4)}
    true_j = len(grams(words) & grams(changed)) / len(grams(words) | grams(changed))
    assert len(h1.shingles(a)) == len(grams(words))  # one hash per distinct shingle, no collisions here
    assert abs(float(np.mean(s1 == s2)) - true_j) < 0.12
    keys = band_keys(np.stack([s1, s1.copy(), s2]), 16)
    assert keys.shape == (3, 16) and np.array_equal(keys[0], keys[1])
    assert (keys[0] == keys[2]).sum() < 16  # a band matches only where all 8 of its rows agree


LANG_SCRIPT = """
import json, sys
from zagreus.data.filters import LanguageFilter
texts = json.loads(sys.stdin.read())
f = LanguageFilter(["en", "it"], 0.5)
print(json.dumps([f.detect(t)[0] for t in texts] + [f.keep(t) for t in texts]))
"""


def test_language_id_works_without_network(handbook_path):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-n", "true"]).returncode != 0:
        pytest.skip("cannot drop the network here (unshare -n)")
    texts = [handbook(handbook_path, lang, 3)[1] for lang in ("en", "it", "es", "fr")]
    texts.append("Der schnelle braune Fuchs springt über den faulen Hund, und die Katze schläft den ganzen Tag "
                 "auf dem Sofa im Wohnzimmer, während draußen der Regen fällt.")
    # A process with no network at all: a model download would fail here.
    res = subprocess.run(["unshare", "-n", sys.executable, "-c", LANG_SCRIPT], input=json.dumps(texts),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out[:5] == ["en", "it", "es", "fr", "de"]
    assert out[5:] == [True, True, False, False, False]


def test_quality_rules_each_fire_and_handbook_prose_passes(handbook_path):
    cases = {
        "word_count": "Too short to be a document.",
        "mean_word_length": "a b c d e f g h i j " * 10,
        "symbol_ratio": "#tag #word " * 40,
        "bullet_lines": "\n".join(f"- item number {i} with words here" for i in range(60)),
        "ellipsis_lines": "\n".join(f"this line number {i} trails off into the distance and then…" for i in range(60)),
        "duplicate_lines": "\n".join(["this exact line repeats again and again"] * 30 + ["one unique line here"]),
        "alpha_words": " ".join(f"{1000 + i} 2{1000 + i} 3{1000 + i} 4{1000 + i} words" for i in range(20)),
        "lorem_ipsum": "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor. " * 6,
    }
    for rule, text in cases.items():
        assert quality_reason(text) == rule, rule
    good = [t for t in handbook(handbook_path, "it", 40)]
    assert sum(quality_reason(t) is None for t in good) >= 38


def test_length_language_and_quality_counts_in_manifest(tmp_path, handbook_path):
    en = handbook(handbook_path, "en", 6)
    it = [t for i, t in enumerate(handbook(handbook_path, "it", 6)) if i != 4]  # page 5 is mostly untranslated English
    short = "Tiny page."
    spam = "\n".join(["buy now buy now cheap cheap offer today"] * 40)
    records = [{"text": t} for t in en + it + [short, spam]]
    path = tmp_path / "mix.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = DataSection(sources=[{"name": "web", "path": str(path)}],
                       filters={"min_chars": 200, "languages": ["it"], "dedup": "none"}, validation_fraction=0)
    m = tokenize_data(data, tmp_path / "out", TokenizerSection(kind="llama3"), show_progress=False)["sources"]["web"]
    assert m["read"] == {"docs": 13, "chars": sum(len(r["text"]) for r in records)}
    assert m["filters"]["length"] == {"docs": 1, "chars": len(short)}
    assert m["filters"]["language"] == {"docs": 7, "chars": sum(map(len, en)) + len(spam)}
    assert m["train"]["docs"] + m["filters"].get("quality", {}).get("docs", 0) == 5
    assert m["train"]["chars"] == sum(len(t) for t in it if quality_reason(t) is None)
