"""The Llama-3 tokenizer against tiktoken itself, its tokenizer.json export, and BPE training."""

from __future__ import annotations

import json

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tokenizers import Tokenizer as HFTokenizer
from transformers import AutoTokenizer

from zagreus.tokenizer import LLAMA3_PATTERN, llama3_model_path, load_tokenizer, train_bpe

HARD_STRINGS = [
    "Ciao! 👋🏽 Come stai? 🇮🇹🍕 — perché no… «citazione»",
    "日本語のテキストと中文字符，还有한국어 문장.",
    "Àà Èè Éé Ìì Òò Ùù Çç Ññ Ãã Õõ Œœ ß naïve façade São Paulo über",
    "12345678901234567890 3.14159265358979 1,000,000 007 2026-11-26",
    "a  b   c    d\n\n\n\t\tindent\r\n   \n  trailing   ",
    "def f(x):\n    return {'k': [x ** 2 for x in range(10)]}  # comment\n",
    "<|begin_of_text|> <|end_of_text|><|eot_id|><|im_start|>user\nhi<|im_end|>",
    "",
    " ",
    "\u200b\u00a0zero-width and nbsp\ufeff",
]


@pytest.fixture(scope="module")
def reference_encoding() -> tiktoken.Encoding:
    """tiktoken built straight from Meta's file, the way llama-models does."""
    ranks = load_tiktoken_bpe(str(llama3_model_path()))
    return tiktoken.Encoding(name="ref", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})


@pytest.fixture(scope="module")
def exported(tmp_path_factory, llama3_tokenizer):
    out = tmp_path_factory.mktemp("llama3-export")
    llama3_tokenizer.save(out)
    hf = HFTokenizer.from_file(str(out / "tokenizer.json"))
    hf.encode_special_tokens = True  # special-token strings in documents are text
    return out, hf


def test_llama3_layout(llama3_tokenizer):
    tok = llama3_tokenizer
    assert tok.vocab_size == 128256
    assert (tok.bos_id, tok.eos_id, tok.token_id("<|eot_id|>")) == (128000, 128001, 128009)
    assert tok.token_id("<|start_header_id|>") == 128006


def test_hard_strings_match_tiktoken(llama3_tokenizer, reference_encoding, exported):
    _, hf = exported
    for text in HARD_STRINGS:
        want = reference_encoding.encode_ordinary(text)
        assert llama3_tokenizer.encode(text) == want, text
        assert hf.encode(text, add_special_tokens=False).ids == want, text
        assert llama3_tokenizer.decode(want) == text


def test_special_tokens_when_allowed(llama3_tokenizer, exported):
    out, _ = exported
    text = "<|begin_of_text|><|im_start|>user\nciao<|im_end|>"
    ids = llama3_tokenizer.encode(text, allow_special=True)
    assert ids[:2] == [128000, 128012]
    hf = HFTokenizer.from_file(str(out / "tokenizer.json"))
    assert hf.encode(text, add_special_tokens=False).ids == ids


def test_handbook_matches_tiktoken(handbook_path, reference_encoding, exported):
    _, hf = exported
    texts = [json.loads(line)["text"] for line in handbook_path.open(encoding="utf-8")]
    assert len(texts) == 635
    want = reference_encoding.encode_ordinary_batch(texts)
    got = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    mismatched = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    assert not mismatched, f"{len(mismatched)} documents differ, first {mismatched[:5]}"
    assert sum(map(len, want)) == 1_534_252  # the count in shared/data/README.md


def test_transformers_autotokenizer_adds_bos(exported, reference_encoding):
    out, _ = exported
    auto = AutoTokenizer.from_pretrained(out)
    text = HARD_STRINGS[0]
    assert auto(text).input_ids == [128000] + reference_encoding.encode_ordinary(text)
    assert auto.decode(auto(text).input_ids, skip_special_tokens=True) == text


def test_train_bpe_roundtrip(tmp_path):
    texts = ["Il gatto dorme sul divano. The cat sleeps on the sofa. 12345"] * 50 + ["def main():\n    pass\n"] * 50
    tok = train_bpe(texts, 400, tmp_path)
    # This corpus runs out of pairs to merge before 400; every byte and special token is there.
    assert 256 + 8 < tok.vocab_size <= 400
    for text in texts[:1] + texts[-1:] + HARD_STRINGS:
        assert tok.decode(tok.encode(text)) == text
    # Special tokens are recognised only when asked for.
    assert tok.encode("<|im_start|>", allow_special=True) == [tok.token_id("<|im_start|>")]
    assert len(tok.encode("<|im_start|>")) > 1
    reloaded = load_tokenizer(str(tmp_path))
    assert reloaded.fingerprint == tok.fingerprint
    assert reloaded.encode(texts[0]) == tok.encode(texts[0])


def test_batch_with_specials_equals_one_at_a_time(llama3_tokenizer, exported, tmp_path):
    """encode_batch(allow_special=True), which the evaluator uses on all of a task's strings at once,
    gives encode(allow_special=True)'s ids for each text: tiktoken, the exported tokenizer.json, a trained BPE."""
    bpe = train_bpe(HARD_STRINGS * 20, 400, tmp_path / "bpe")
    for tok in (llama3_tokenizer, load_tokenizer(str(exported[0])), bpe):
        assert tok.encode_batch(HARD_STRINGS, allow_special=True) == [tok.encode(t, allow_special=True) for t in HARD_STRINGS]
    # The special-token string is one id with specials allowed, and text without.
    assert llama3_tokenizer.encode_batch(["<|eot_id|>"], allow_special=True) == [[llama3_tokenizer.special_tokens["<|eot_id|>"]]]
    assert len(llama3_tokenizer.encode_batch(["<|eot_id|>"])[0]) > 1


@pytest.fixture()
def fresh_llama3(monkeypatch):
    """A Llama-3 tokenizer of its own (not load_tokenizer's cached one) that switches to fastokens at once."""
    import zagreus.tokenizer as tokenizer

    monkeypatch.setattr(tokenizer, "FAST_AFTER_CHARS", 0)
    monkeypatch.setattr(tokenizer, "FAST_AFTER_CHARS_CACHED", 0)
    return tokenizer.Tokenizer.from_tiktoken_file(llama3_model_path(), name="llama3")


def test_fastokens_matches_tiktoken(handbook_path, reference_encoding, llama3_tokenizer):
    """fastokens' ids, single and batch, are tiktoken's on the hard strings and on handbook pages."""
    pytest.importorskip("fastokens")
    from zagreus.tokenizer import _load_fastokens

    fast = _load_fastokens(llama3_tokenizer)
    assert fast is not None
    pages = [json.loads(line)["text"] for line in handbook_path.open(encoding="utf-8")][::60]
    for texts in (HARD_STRINGS, pages):
        want = reference_encoding.encode_ordinary_batch(texts)
        assert [fast.encode_ordinary(t).ids for t in texts] == want
        assert [e.ids for e in fast.encode_batch(texts, split_special_tokens=True)] == want


def test_fastokens_json_is_cached_and_a_damaged_cache_is_made_again(tmp_path, monkeypatch, llama3_tokenizer,
                                                                     reference_encoding):
    """The first load writes the engine's tokenizer.json under XDG_CACHE_HOME; the next one reads it
    instead of converting the ranks again; a damaged cache file is replaced."""
    pytest.importorskip("fastokens")
    import zagreus.tokenizer as tokenizer

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = tmp_path / "zagreus" / "fastokens" / f"{llama3_tokenizer.fingerprint}.json"
    assert tokenizer._load_fastokens(llama3_tokenizer) is not None and cache.is_file()
    made = cache.read_bytes()
    convert = tokenizer._llama3_hf_from_tiktoken

    def no_conversion(tok):
        raise AssertionError("the cached json was not used")

    monkeypatch.setattr(tokenizer, "_llama3_hf_from_tiktoken", no_conversion)
    fast = tokenizer._load_fastokens(llama3_tokenizer)
    assert [fast.encode_ordinary(t).ids for t in HARD_STRINGS] == reference_encoding.encode_ordinary_batch(HARD_STRINGS)
    cache.write_bytes(made[: len(made) // 2])  # cut short, as by a full disk
    monkeypatch.setattr(tokenizer, "_llama3_hf_from_tiktoken", convert)
    assert tokenizer._load_fastokens(llama3_tokenizer) is not None and cache.read_bytes() == made


def test_tokenizer_encodes_with_fastokens(fresh_llama3, reference_encoding):
    pytest.importorskip("fastokens")
    tok = fresh_llama3
    want = reference_encoding.encode_ordinary_batch(HARD_STRINGS)
    assert tok.encode_batch(HARD_STRINGS) == want
    assert tok._fast, "fastokens was not loaded"
    assert [tok.encode(t) for t in HARD_STRINGS] == want
    assert tok.identity() == load_tokenizer("llama3").identity()  # shards made with tiktoken still match
    assert tok.encode(HARD_STRINGS[6], allow_special=True)[:1] == [tok.bos_id]  # specials stay tiktoken's


def test_a_process_told_it_will_encode_much_loads_fastokens_at_once(monkeypatch, reference_encoding):
    """expect(chars): past the switch point fastokens is loaded before the first text, below it
    tiktoken goes on until the switch point; the ids are tiktoken's either way."""
    pytest.importorskip("fastokens")
    import zagreus.tokenizer as tokenizer

    monkeypatch.setattr(tokenizer, "FAST_AFTER_CHARS", 1000)
    monkeypatch.setattr(tokenizer, "FAST_AFTER_CHARS_CACHED", 1000)
    small, large = (tokenizer.Tokenizer.from_tiktoken_file(llama3_model_path(), name="llama3") for _ in range(2))
    small.expect(999)
    large.expect(1000)
    assert small._fast is None and large._fast
    want = reference_encoding.encode_ordinary_batch(HARD_STRINGS)
    assert small.encode_batch(HARD_STRINGS[:1]) == want[:1] and small._fast is None  # under 1000 characters so far
    assert large.encode_batch(HARD_STRINGS) == want


def test_tiktoken_when_fastokens_is_missing_or_fails(fresh_llama3, reference_encoding, monkeypatch, tmp_path):
    import sys

    tok = fresh_llama3
    want = reference_encoding.encode_ordinary_batch(HARD_STRINGS)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "fastokens", None)  # import fastokens raises ImportError
        assert tok.encode_batch(HARD_STRINGS) == want
    assert tok._fast is False
    assert [tok.encode(t) for t in HARD_STRINGS] == want

    import zagreus.tokenizer as tokenizer

    def unconvertible(_tok):
        raise RuntimeError("no tokenizer.json")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no cached json to fall back on
    monkeypatch.setattr(tokenizer, "_llama3_hf_from_tiktoken", unconvertible)  # installed but fails to load
    assert tokenizer._load_fastokens(tok) is None

    class Broken:
        def encode_ordinary(self, text):
            raise RuntimeError("engine failure")

        encode_batch = encode_ordinary

    tok._fast = Broken()  # an engine that fails on a text leaves it to tiktoken
    assert tok.encode_batch(HARD_STRINGS) == want
    assert [tok.encode(t) for t in HARD_STRINGS] == want


@pytest.fixture()
def trained_bpe(tmp_path, handbook_path):
    """A 1,000-token BPE trained on handbook pages, with the texts it is checked on."""
    pages = [json.loads(line)["text"] for line in handbook_path.open(encoding="utf-8")][:120]
    train_bpe(pages, 1000, tmp_path / "bpe")
    return tmp_path / "bpe", pages + HARD_STRINGS + [t[::-1] for t in pages[:20]]


def fresh(folder):
    """The folder's tokenizer, a new object (load_tokenizer keeps one per folder)."""
    from zagreus.tokenizer import Tokenizer

    return Tokenizer.from_tokenizer_json(folder / "tokenizer.json")


def _tokenizers_ids(folder, texts: list[str], specials_as_text: bool) -> list[list[int]]:
    hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    hf.encode_special_tokens = specials_as_text
    return [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]


def test_tokenizer_json_batches_go_through_fastokens_past_the_switch_point(trained_bpe, exported, monkeypatch):
    """A trained BPE's and the Llama-3 export's batches: tokenizers' own ids, special-token strings
    as text and as control tokens, from fastokens once a batch reaches the switch point; below it
    tokenizers encodes, and expect() loads fastokens ahead."""
    pytest.importorskip("fastokens")
    import zagreus.tokenizer as tokenizer

    folder, texts = trained_bpe
    chars = sum(map(len, texts))
    tok = fresh(folder)
    assert tok._switch_point() == tokenizer.HF_FAST_AFTER_CHARS + tokenizer.HF_FAST_AFTER_CHARS_PER_TOKEN * tok.vocab_size
    monkeypatch.setattr(tokenizer, "HF_FAST_AFTER_CHARS_PER_TOKEN", 0)
    monkeypatch.setattr(tokenizer, "HF_FAST_AFTER_CHARS", chars)
    want_text, want_control = (_tokenizers_ids(folder, texts, as_text) for as_text in (True, False))
    assert tok.encode_batch(texts[:5]) == want_text[:5] and tok._fast is None  # under the switch point
    assert tok.encode_batch(texts) == want_text and tok._fast  # crosses it
    assert tok.encode_batch(texts, allow_special=True) == want_control
    assert want_control != want_text  # the hard strings hold special-token strings

    below, ahead = fresh(folder), fresh(folder)
    below.expect(chars - 1)
    ahead.expect(chars)
    assert below._fast is None
    assert ahead._fast and ahead.encode_batch(texts, allow_special=True) == want_control

    monkeypatch.setattr(tokenizer, "HF_FAST_AFTER_CHARS", 0)
    # The Llama-3 export read as a tokenizer.json (load_tokenizer gives tiktoken for it): 128k entries.
    llama = fresh(exported[0])
    assert llama.encode_batch(texts) == _tokenizers_ids(exported[0], texts, True) and llama._fast
    assert llama.encode_batch(texts, allow_special=True) == _tokenizers_ids(exported[0], texts, False)


def test_tokenizers_when_fastokens_is_missing_or_differs(trained_bpe, monkeypatch, caplog):
    import sys

    import zagreus.tokenizer as tokenizer

    folder, texts = trained_bpe
    monkeypatch.setattr(tokenizer, "HF_FAST_AFTER_CHARS", 0)
    want = _tokenizers_ids(folder, texts, True)
    tok = fresh(folder)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "fastokens", None)  # import fastokens raises ImportError
        assert tok.encode_batch(texts) == want
    assert tok._fast is False

    class Unlike:  # loads, but gives other ids on the probes
        class Tokenizer:
            ids = [0]

            @classmethod
            def from_json_str(cls, spec):
                return cls()

            def encode_batch(self, texts, split_special_tokens=False):
                return [self for _ in texts]

    other = fresh(folder)
    with monkeypatch.context() as m, caplog.at_level("WARNING", logger="zagreus.tokenizer"):
        m.setitem(sys.modules, "fastokens", Unlike)
        assert other.encode_batch(texts) == want
    assert other._fast is False and "ids differ from tokenizers'" in caplog.text
