"""Document filters and deduplication: length, language, quality, exact and MinHash near-duplicates.

Every filter answers per document, so the pipeline can count documents and characters removed
by each (they appear in the manifest under `filters`). Filters run in this order, the first
that rejects a document takes the count: length, language, quality, then (globally, in the
fixed merge order, so the result does not depend on the number of workers) exact dedup and
MinHash near-dedup; the first occurrence of a document is kept.

Quality rules (document level; thresholds from Gopher, Rae et al. 2021, appendix A, and C4,
Raffel et al. 2020). A document is removed when:
  * words (whitespace-separated) < 50 or > 100,000                      [gopher: word_count]
  * mean word length < 3 or > 10 characters                              [gopher: mean_word_length]
  * symbols per word > 0.1, symbols being '#' and '...'/'…'              [gopher: symbol_ratio]
  * more than 90% of lines start with a bullet (•, ‣, -, *, ·)           [gopher: bullet_lines]
  * more than 30% of lines end with an ellipsis                          [gopher: ellipsis_lines]
  * fewer than 80% of words contain an alphabetic character              [gopher: alpha_words]
  * duplicated lines are > 30% of lines or hold > 20% of the characters  [gopher: duplicate_lines]
  * it contains "lorem ipsum"                                            [c4: lorem_ipsum]
Not applied, on purpose: Gopher's English stop-word rule (this project is multilingual), C4's
"{" rule and line-level edits (they strip technical and code-heavy text). Code sources skip the
language and quality filters.

Language identification uses lingua (`lingua-language-detector`), whose n-gram models ship
inside the wheel: nothing is downloaded (tests/test_data_filters.py blocks the network to
prove it). Only the first `LANGUAGE_PREFIX` characters are classified, which keeps it fast.

Exact dedup hashes the normalised text (lower case, whitespace collapsed) with BLAKE2b; the
same digest decides the validation split, so duplicates can never straddle train and val.
MinHash works on n-grams of token ids (the tokens are already computed, which makes shingling
free); signatures use multiply-shift hashing with a fixed seed, LSH bands find candidates and
a candidate counts as a duplicate only when its estimated Jaccard similarity reaches the
threshold. The index lives in memory (about 0.5 KB per kept document); web-scale runs should
shard it by band as datatrove's multi-stage MinHash does.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

LANGUAGE_PREFIX = 2000
# Candidates for language ID beyond the requested languages, so that e.g. German text is
# recognised as German instead of being forced into the closest requested language.
LANGUAGE_CANDIDATES = ["en", "it", "es", "fr", "pt", "de", "nl", "ca", "ro", "pl", "ru", "sv", "da", "tr", "la"]
BULLETS = ("•", "‣", "-", "*", "·")
# A whitespace-separated word made only of digits, '_' and punctuation (no letter); a regex
# count is ~3x faster than testing every character of every word in Python.
_NO_LETTER_WORD = re.compile(r"(?<!\S)(?:[\d_]|[^\w\s])+(?!\S)")


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def text_digest(text: str) -> tuple[int, int]:
    """(dedup key, split key): two independent 64-bit halves of one BLAKE2b digest."""
    d = hashlib.blake2b(normalise(text).encode("utf-8"), digest_size=16).digest()
    return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little")


def is_validation(split_key: int, fraction: float) -> bool:
    return split_key % 1_000_000 < round(fraction * 1_000_000)


def length_ok(text: str, min_chars: int, max_chars: int | None) -> bool:
    return min_chars <= len(text) and (max_chars is None or len(text) <= max_chars)


def quality_reason(text: str) -> str | None:
    """The first quality rule the document breaks (see the module docstring), or None."""
    words = text.split()
    n = len(words)
    if n < 50 or n > 100_000:
        return "word_count"
    mean_len = sum(map(len, words)) / n
    if mean_len < 3 or mean_len > 10:
        return "mean_word_length"
    if (text.count("#") + text.count("...") + text.count("…")) / n > 0.1:
        return "symbol_ratio"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines:
        if sum(line.startswith(BULLETS) for line in lines) / len(lines) > 0.9:
            return "bullet_lines"
        if sum(line.endswith(("...", "…")) for line in lines) / len(lines) > 0.3:
            return "ellipsis_lines"
        seen: set[str] = set()
        dup_lines = dup_chars = 0
        for line in lines:
            if line in seen:
                dup_lines += 1
                dup_chars += len(line)
            else:
                seen.add(line)
        if dup_lines / len(lines) > 0.3 or dup_chars / max(1, sum(map(len, lines))) > 0.2:
            return "duplicate_lines"
    if (n - len(_NO_LETTER_WORD.findall(text))) / n < 0.8:
        return "alpha_words"
    if "lorem ipsum" in text.lower():
        return "lorem_ipsum"
    return None


class LanguageFilter:
    """Keeps documents whose most likely language is allowed, with confidence >= threshold."""

    def __init__(self, allowed: list[str], threshold: float):
        from lingua import IsoCode639_1, Language, LanguageDetectorBuilder  # its models load in seconds; only when used

        def lang(code: str) -> Language:
            try:
                return Language.from_iso_code_639_1(getattr(IsoCode639_1, code.upper()))
            except AttributeError:
                raise ValueError(f"unknown ISO 639-1 language code '{code}'") from None

        self.allowed = {c.lower() for c in allowed}
        candidates = {lang(c) for c in list(self.allowed) + LANGUAGE_CANDIDATES}
        self.threshold = threshold
        self._detector = LanguageDetectorBuilder.from_languages(*candidates).build()

    def detect(self, text: str) -> tuple[str | None, float]:
        values = self._detector.compute_language_confidence_values(text[:LANGUAGE_PREFIX])
        if not values:
            return None, 0.0
        top = values[0]
        return top.language.iso_code_639_1.name.lower(), top.value

    def keep(self, text: str) -> bool:
        code, confidence = self.detect(text)
        return code in self.allowed and confidence >= self.threshold


_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_PRIME = np.uint64(1099511628211)
_PRIME_INVERSE = np.uint64(pow(1099511628211, -1, 2**64))


def _splitmix(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(30))
    h = h * _MIX1
    h = h ^ (h >> np.uint64(27))
    h = h * _MIX2
    return h ^ (h >> np.uint64(31))


class MinHasher:
    """MinHash signatures (uint32 x num_perm) of the word n-grams of a document's normalised text.

    Shingles are hashed without a Python loop: a polynomial prefix hash over the UTF-8 bytes gives
    any span's hash from two prefix values and a power of the inverse base (all arithmetic mod 2^64,
    numpy's uint64 wrap-around), so one document costs a handful of array operations."""

    def __init__(self, num_perm: int = 112, ngram: int = 5, seed: int = 1234):
        rng = np.random.default_rng(seed)
        self.num_perm, self.ngram = num_perm, ngram
        self.a = rng.integers(1, 2**63, num_perm, dtype=np.uint64) | np.uint64(1)
        self.b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
        self._powers = np.ones(1, np.uint64)     # _PRIME ** i, grown on demand
        self._inverse = np.ones(1, np.uint64)    # _PRIME ** -i

    def _grow(self, n: int) -> None:
        if len(self._powers) < n:
            size = max(n, 2 * len(self._powers))
            with np.errstate(over="ignore"):
                self._powers, self._inverse = np.ones(size, np.uint64), np.ones(size, np.uint64)
                np.cumprod(np.full(size - 1, _PRIME, np.uint64), out=self._powers[1:])  # wraps mod 2^64, as intended
                np.cumprod(np.full(size - 1, _PRIME_INVERSE, np.uint64), out=self._inverse[1:])

    def shingles(self, text: str) -> np.ndarray:
        """The distinct hashes of the text's word n-grams (the whole text when it has fewer words)."""
        raw = np.frombuffer(normalise(text).encode("utf-8"), dtype=np.uint8)
        if len(raw) == 0:
            return np.zeros(1, dtype=np.uint64)
        spaces = np.flatnonzero(raw == 32)   # normalised: words are separated by exactly one space
        starts = np.concatenate([[0], spaces + 1])
        ends = np.concatenate([spaces, [len(raw)]])
        n = min(self.ngram, len(starts))
        first, last = starts[:len(starts) - n + 1], ends[n - 1:]
        self._grow(len(raw) + 1)
        with np.errstate(over="ignore"):
            prefix = np.zeros(len(raw) + 1, np.uint64)
            np.cumsum((raw.astype(np.uint64) + np.uint64(1)) * self._powers[:len(raw)], out=prefix[1:])
            spans = (prefix[last] - prefix[first]) * self._inverse[first]
            return np.unique(_splitmix(spans))

    def signature(self, text: str) -> np.ndarray:
        sh = self.shingles(text)
        out = np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
        with np.errstate(over="ignore"):
            for lo in range(0, len(sh), 2048):
                v = (sh[lo:lo + 2048, None] * self.a + self.b) >> np.uint64(32)
                np.minimum(out, v.min(axis=0).astype(np.uint32), out=out)
        return out


def band_keys(signatures: np.ndarray, bands: int) -> np.ndarray:
    """One 64-bit key per LSH band of each signature ([docs, num_perm] -> [docs, bands]): two
    documents share a band's key when they agree on all of its rows (up to hash collisions)."""
    docs, num_perm = signatures.shape
    rows = num_perm // bands
    keys = np.zeros((docs, bands), np.uint64)
    with np.errstate(over="ignore"):
        for r in range(rows):
            keys = _splitmix(keys * _PRIME + signatures[:, r::rows][:, :bands].astype(np.uint64))
    return keys
