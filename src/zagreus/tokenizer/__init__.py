"""Tokenizers: the Llama-3 tokenizer offline (tiktoken), any local tokenizer.json, BPE training,
and export to a Hugging Face `tokenizer.json` that encodes exactly like tiktoken.

Documents are encoded with special-token strings treated as plain text, so a web page that
happens to contain "<|end_of_text|>" cannot inject control tokens; chat rendering asks for
special tokens explicitly with `encode(..., allow_special=True)`.

A text longer than CHUNK_CHARS is encoded (and trained on) in pieces cut where the split pattern
ends a piece whatever follows (`_pieces`): the ids of the whole text in bounded memory. Hugging
Face tokenizers take about 140 bytes per character of a text encoded at once (7.0 GB peak for one
50 MB document in `zagreus data tokenize`, 0.96 GB in pieces). A tokenizer.json with another
pre-tokenizer or a normalizer is encoded whole: keep `data.filters.max_chars` within its reach.

Ordinary text (special-token strings as text) of the Llama-3 tokenizer goes through fastokens when
it is installed, once a process has encoded FAST_AFTER_CHARS characters: the same ids as tiktoken
(benchmarks/bpe_engines.py: every handbook page, the hard strings of the tests, reversed text),
5-8x its tokens/s. tiktoken stays the fallback, and it alone defines the tokenizer's identity.
Batches (`encode_batch`) of a tokenizer.json that splits like Llama-3 (the BPEs we train, exports)
go through fastokens too, once past `_switch_point`: the ids of Hugging Face tokenizers (checked
at load), about 30x its speed on one thread.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from zagreus.errors import UserError, read_json

log = logging.getLogger(__name__)

# The split pattern of Llama-3 (and of our trained tokenizers).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
# ChatML markers live among the special tokens of the tokenizers we train; for Llama-3 they are
# mapped onto two of its reserved special tokens (see llama3_special_tokens).
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
TRAINED_SPECIALS = [BOS, EOS, "<|pad|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", IM_START, IM_END]

CHUNK_CHARS = 1 << 18  # a longer text is encoded piece by piece, pieces of about this many characters
# Where LLAMA3_PATTERN ends a piece whatever follows: before a space after a non-space, and after a
# newline before a non-space. No alternative of the pattern matches across either point, and the one
# that looks ahead, \s+(?!\S), never makes the piece ending there; so the pieces' ids are the whole
# text's. Python's \s takes in every character the pattern's \s does (Unicode White_Space): its \S is safe.
_CUT = re.compile(r"(?<=\S)(?= )|(?<=\n)(?=\S)")

# Making the fastokens engine takes ~5 s the first time on a machine (3.5 s to turn the ranks into a
# tokenizer.json, 1.6 s for fastokens to read it), about what tiktoken spends on 32 MB; the json is then
# kept in FAST_CACHE, and loading costs the 1.6 s alone, what tiktoken spends on about 12 MB. A
# process encodes that much with tiktoken before switching.
FAST_AFTER_CHARS = 32 << 20
FAST_AFTER_CHARS_CACHED = 12 << 20
# A tokenizer.json: fastokens reads it in about 0.05 s + 14 us per vocabulary entry (4k: 0.09 s, 128k:
# 1.5 s), in which time tokenizers encodes ~0.1 M + 34 characters per entry on one thread (2.45 M
# characters/s; fastokens 75 M). Switch at twice that, for tokenizers' own threads.
HF_FAST_AFTER_CHARS = 1 << 18
HF_FAST_AFTER_CHARS_PER_TOKEN = 70
# Checked at load: an engine that encodes any of these unlike tiktoken is not used.
_FAST_PROBES = ["Ciao! 👋🏽 perché no… «x» 日本語 한국어 façade 12345678 3.14",
                "a  b\n\n\t\tx\r\n   \n  y   ", "<|begin_of_text|><|eot_id|> <|im_start|>", "\u200b\u00a0\ufeff", ""]


def _pieces(text: str, size: int) -> Iterator[str]:
    """`text` in consecutive pieces of at least `size` characters (the last may be shorter), cut at _CUT."""
    start = 0
    while len(text) - start > size and (cut := _CUT.search(text, start + size)) is not None:
        yield text[start:cut.start()]
        start = cut.start()
    yield text[start:]


def _llama3_pre_tokenizer():
    """The pre-tokenizer of the BPEs we train: Llama-3's split pattern, then bytes as characters."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _splits_like_llama3(hf) -> bool:
    """Whether a Hugging Face tokenizer cuts text only where LLAMA3_PATTERN does, so pieces may be encoded apart:
    no normalizer, our pre-tokenizer, and no added token other than the special ones (kept as text)."""
    return (hf.normalizer is None and hf.pre_tokenizer is not None
            and hf.pre_tokenizer.__getstate__() == _llama3_pre_tokenizer().__getstate__()
            and all(t.special for t in hf.get_added_tokens_decoder().values()))


def llama3_model_path() -> Path:
    """The Llama-3 tiktoken file shipped by the PyPI package llama-models."""
    try:
        import llama_models
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise UserError("the Llama-3 tokenizer needs the package llama-models: pip install llama-models") from exc
    return Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"


def llama3_special_tokens(n_base: int) -> dict[str, int]:
    """The 256 special tokens of Llama-3, in Meta's order, with ChatML markers on two reserved slots."""
    named = [
        BOS, EOS, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
        "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
    ]
    names = named + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(named))]
    # Reserved slots 2 and 3 (ids 128012, 128013) carry ChatML for post-training.
    names[names.index("<|reserved_special_token_2|>")] = IM_START
    names[names.index("<|reserved_special_token_3|>")] = IM_END
    return {name: n_base + i for i, name in enumerate(names)}


class Tokenizer:
    """One interface over a tiktoken encoding (fast, Llama-3) or a Hugging Face tokenizers model."""

    def __init__(self, name: str, fingerprint: str, special_tokens: dict[str, int], *, tiktoken_enc=None, hf=None):
        self.name = name
        self.fingerprint = fingerprint
        self.special_tokens = special_tokens
        self._tt = tiktoken_enc
        self._hf = hf
        self.bos_id = special_tokens[BOS]
        self.eos_id = special_tokens[EOS]
        self._id_to_special = {v: k for k, v in special_tokens.items()}
        self._in_pieces = tiktoken_enc is not None or _splits_like_llama3(hf)  # tiktoken's pattern is LLAMA3_PATTERN
        self._fast = None  # the fastokens engine once loaded, False where it cannot be
        self._slow_chars = 0  # characters encoded by tiktoken / tokenizers (where fastokens can take over) so far

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_tiktoken_file(cls, path: Path, name: str | None = None) -> "Tokenizer":
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(str(path))
        specials = llama3_special_tokens(len(ranks))
        enc = tiktoken.Encoding(name=path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
        digest = hashlib.sha256(path.read_bytes() + json.dumps(specials, sort_keys=True).encode()).hexdigest()
        return cls(name or str(path), digest[:16], specials, tiktoken_enc=enc)

    @classmethod
    def from_tokenizer_json(cls, path: Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for a file it cannot parse
            raise UserError(f"{path}: not a readable tokenizer file ({exc}); copy it again from where it came from") from None
        specials = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}
        for required in (BOS, EOS):
            if required not in specials:
                raise UserError(f"{path}: tokenizer has no special token {required}; add it or train with `zagreus tokenizer train`")
        hf.encode_special_tokens = True
        name, fingerprint = str(path), hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        # A folder we saved keeps the identity of the tokenizer it was saved from, so shards made
        # with tiktoken's Llama-3 are accepted by the same tokenizer read back from tokenizer.json.
        config_path = path.with_name("tokenizer_config.json")
        if config_path.is_file():
            saved = read_json(config_path).get("zagreus_tokenizer")
            if saved:
                name, fingerprint = saved["name"], saved["fingerprint"]
        return cls(name, fingerprint, specials, hf=hf)

    # --- encoding -----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tt.n_vocab if self._tt is not None else self._hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        if not allow_special:
            ids = self._ordinary(text)
        elif self._tt is not None:
            ids = self._tt.encode(text, allowed_special="all")
        else:
            with _specials_as_control(self._hf):
                ids = self._hf.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def _long(self, text: str) -> bool:
        return len(text) > CHUNK_CHARS and self._in_pieces

    def expect(self, chars: int) -> None:
        """This process is about to encode about `chars` characters of ordinary text. Where loading
        fastokens pays for itself on that much, it is loaded now, not after the first switch point's
        worth has gone through the slower tiktoken."""
        if self._fast is None and self._may_go_fast() and chars >= self._switch_point():
            self._fast = self._load_fast()

    def _may_go_fast(self) -> bool:
        # A tokenizer.json with a normalizer or another pre-tokenizer is left to tokenizers: untested.
        return self._tt is not None or self._in_pieces

    def _switch_point(self) -> int:
        if self._tt is None:
            return HF_FAST_AFTER_CHARS + HF_FAST_AFTER_CHARS_PER_TOKEN * self.vocab_size
        return FAST_AFTER_CHARS_CACHED if _fast_cache_path(self).is_file() else FAST_AFTER_CHARS

    def _load_fast(self):
        return (_load_fastokens(self) if self._tt is not None else _fastokens_over_tokenizer_json(self)) or False

    def _fast_engine(self, chars: int):
        """The fastokens engine, loaded once `_switch_point` characters have gone through tiktoken or
        tokenizers (or at `expect`); None while they encode (always, where fastokens is missing or
        fails to load)."""
        if self._fast is None and self._may_go_fast():
            self._slow_chars += chars
            if self._slow_chars >= self._switch_point():
                self._fast = self._load_fast()
        return self._fast or None

    def _at_once(self, text: str) -> list[int]:
        """Special-token strings as text (the Hugging Face backend is loaded that way)."""
        if self._tt is not None:
            if (fast := self._fast_engine(len(text))) is not None:
                try:
                    return fast.encode_ordinary(text).ids
                except Exception as exc:  # noqa: BLE001 - e.g. a PCRE2 limit; tiktoken gives the same ids
                    log.debug("fastokens failed on a text (%s); tiktoken encodes it", exc)
            return self._tt.encode_ordinary(text)
        # encode_batch releases the GIL where encode holds it (about 1 s per MB): the server
        # tokenizes on helper threads and its event loop must keep answering meanwhile.
        return self._hf.encode_batch([text], add_special_tokens=False)[0].ids

    def _ordinary(self, text: str) -> list[int]:
        if not self._long(text):
            return self._at_once(text)
        ids: list[int] = []
        for piece in _pieces(text, CHUNK_CHARS):
            ids += self._at_once(piece)
        return ids

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        """Special-token strings as text (unless allow_special, as in encode); multi-threaded in both
        backends, long texts one at a time in pieces."""
        texts = list(texts)
        if allow_special:
            if self._tt is not None:
                return self._tt.encode_batch(texts, allowed_special="all")
            if (ids := self._fast_batch(texts, split_special_tokens=False)) is not None:
                return ids
            with _specials_as_control(self._hf):
                return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]
        short = [t for t in texts if not self._long(t)]
        ids = self._fast_batch(short, split_special_tokens=True)
        if ids is None:
            ids = (self._tt.encode_ordinary_batch(short) if self._tt is not None
                   else [e.ids for e in self._hf.encode_batch(short, add_special_tokens=False)])
        encoded = iter(ids)
        return [self._ordinary(t) if self._long(t) else next(encoded) for t in texts]

    def _fast_batch(self, texts: list[str], split_special_tokens: bool) -> list[list[int]] | None:
        """fastokens' ids for `texts` once past the switch point; None before it, or where it fails on them."""
        if (fast := self._fast_engine(sum(map(len, texts)))) is None:
            return None
        try:
            return [e.ids for e in fast.encode_batch(texts, split_special_tokens=split_special_tokens)]
        except Exception as exc:  # noqa: BLE001 - as in _at_once
            log.debug("fastokens failed on a batch (%s); %s encodes it", exc, "tiktoken" if self._tt is not None else "tokenizers")
            return None

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        if self._tt is not None:
            return self._tt.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        if token not in self.special_tokens:
            raise UserError(f"tokenizer {self.name} has no special token {token}")
        return self.special_tokens[token]

    # --- Hugging Face export ------------------------------------------------------------
    def to_hf(self):
        """A `tokenizers.Tokenizer` that encodes like this one (BOS added as in Meta's Llama-3 files)."""
        from tokenizers import processors

        if self._hf is not None:
            hf = _clone_hf(self._hf)
        else:
            hf = _llama3_hf_from_tiktoken(self)
        hf.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, self.bos_id)]
            ),
        ])
        return hf

    def save(self, out_dir: Path, chat_template: str | None = None, model_max_length: int = 4096) -> None:
        """Write tokenizer.json and tokenizer_config.json loadable by transformers' AutoTokenizer."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        hf = self.to_hf()
        hf.encode_special_tokens = False
        (out_dir / "tokenizer.json").write_text(hf.to_str(pretty=False), encoding="utf-8")
        pad = "<|finetune_right_pad_id|>" if "<|finetune_right_pad_id|>" in self.special_tokens else "<|pad|>"
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": pad if pad in self.special_tokens else EOS,
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False,
            "model_input_names": ["input_ids", "attention_mask"],
            "zagreus_tokenizer": {"name": self.name, "fingerprint": self.fingerprint},
        }
        if chat_template is not None:
            cfg["chat_template"] = chat_template
        (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def identity(self) -> dict:
        return {"name": self.name, "fingerprint": self.fingerprint, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id}


@contextlib.contextmanager
def _specials_as_control(hf):
    """Within the block, `hf` (loaded with special-token strings as text) reads them as control tokens."""
    hf.encode_special_tokens = False
    try:
        yield
    finally:
        hf.encode_special_tokens = True


def _clone_hf(hf):
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_str(hf.to_str())


@functools.lru_cache(maxsize=4)
def _llama3_hf_json(model_path: str, specials_json: str) -> str:
    # Converting 128k ranks to merges takes ~2 s; cache the result per process.
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    hf = TikTokenConverter(vocab_file=model_path, pattern=LLAMA3_PATTERN).converted()
    specials = json.loads(specials_json)
    hf.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in sorted(specials, key=specials.get)])
    return hf.to_str()


def _llama3_hf_from_tiktoken(tok: Tokenizer):
    from tokenizers import Tokenizer as HFTokenizer

    path = tok.name if Path(tok.name).is_file() else str(llama3_model_path())
    hf = HFTokenizer.from_str(_llama3_hf_json(path, json.dumps(tok.special_tokens)))
    for name, idx in tok.special_tokens.items():
        if hf.token_to_id(name) != idx:
            raise RuntimeError(f"special token {name} got id {hf.token_to_id(name)} instead of {idx}")
    return hf


def _load_fastokens(tok: Tokenizer):
    """fastokens over `tok`'s tiktoken ranks and LLAMA3_PATTERN (through its tokenizer.json: fastokens'
    own tiktoken reader refuses Llama-3's ranks), or None, logged, where it is missing or unlike tiktoken."""
    try:
        import fastokens
    except ImportError:
        log.debug("fastokens is not installed; tiktoken encodes")
        return None
    cache = _fast_cache_path(tok)
    try:
        try:  # a cached json that is damaged or encodes unlike tiktoken is made again
            return _checked_fastokens(fastokens, tok, cache.read_text(encoding="utf-8"))
        except Exception:  # noqa: BLE001
            pass
        hf = _llama3_hf_from_tiktoken(tok)
        hf.post_processor = None  # bare ids, no BOS
        spec = hf.to_str()
        fast = _checked_fastokens(fastokens, tok, spec)
    except Exception as exc:  # noqa: BLE001 - any failure of the optional engine leaves tiktoken
        log.warning("fastokens not used for %s (%s); tiktoken encodes", tok.name, exc)
        return None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
        tmp.write_text(spec, encoding="utf-8")
        os.replace(tmp, cache)
    except OSError as exc:  # a read-only or full home: the engine still works, made again next time
        log.debug("fastokens cache %s not written (%s)", cache, exc)
    return fast


def _fastokens_over_tokenizer_json(tok: Tokenizer):
    """fastokens over `tok`'s tokenizer.json, or None, logged, where it is missing or encodes the
    probes unlike tokenizers (special-token strings as text, and as control tokens)."""
    try:
        import fastokens
    except ImportError:
        log.debug("fastokens is not installed; tokenizers encodes")
        return None
    hf = tok._hf
    try:
        fast = fastokens.Tokenizer.from_json_str(hf.to_str())
        as_text = [e.ids for e in hf.encode_batch(_FAST_PROBES, add_special_tokens=False)]
        with _specials_as_control(hf):
            as_control = [e.ids for e in hf.encode_batch(_FAST_PROBES, add_special_tokens=False)]
        if ([e.ids for e in fast.encode_batch(_FAST_PROBES, split_special_tokens=True)] != as_text
                or [e.ids for e in fast.encode_batch(_FAST_PROBES)] != as_control):
            raise RuntimeError("its ids differ from tokenizers'")
    except Exception as exc:  # noqa: BLE001 - any failure of the optional engine leaves tokenizers
        log.warning("fastokens not used for %s (%s); tokenizers encodes", tok.name, exc)
        return None
    return fast


def _fast_cache_path(tok: Tokenizer) -> Path:
    """Where the fastokens tokenizer.json of `tok` is kept between processes (XDG_CACHE_HOME, else ~/.cache)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "zagreus" / "fastokens" / f"{tok.fingerprint}.json"


def _checked_fastokens(fastokens, tok: Tokenizer, spec: str):
    fast = fastokens.Tokenizer.from_json_str(spec)
    if [fast.encode_ordinary(p).ids for p in _FAST_PROBES] != [tok._tt.encode_ordinary(p) for p in _FAST_PROBES]:
        raise RuntimeError("its ids differ from tiktoken's")
    return fast


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: str = "llama3") -> Tokenizer:
    """'llama3', a tokenizer.json / tokenizer.model file, or a folder holding one."""
    if spec == "llama3":
        return Tokenizer.from_tiktoken_file(llama3_model_path(), name="llama3")
    path = Path(spec)
    if _saved_identity(path).get("name") == "llama3":
        # tiktoken encodes the same ids ~4x faster than the tokenizer.json of a saved Llama-3.
        llama3 = load_tokenizer("llama3")
        if llama3.fingerprint == _saved_identity(path).get("fingerprint"):
            return llama3
    if path.is_dir():
        for candidate in ("tokenizer.json", "tokenizer.model"):
            if (path / candidate).is_file():
                path = path / candidate
                break
        else:
            raise UserError(f"{spec}: no tokenizer.json or tokenizer.model in this folder; pass a tokenizer file or 'llama3'")
    if not path.is_file():
        raise UserError(f"{spec}: tokenizer not found; pass 'llama3', a tokenizer.json, a tiktoken tokenizer.model or a folder")
    if path.suffix == ".json":
        return Tokenizer.from_tokenizer_json(path)
    return Tokenizer.from_tiktoken_file(path)


def _saved_identity(path: Path) -> dict:
    config_path = (path if path.is_dir() else path.parent) / "tokenizer_config.json"
    if not config_path.is_file():
        return {}
    return read_json(config_path).get("zagreus_tokenizer") or {}


def read_texts(paths: Sequence[Path], text_field: str = "text", max_chars: int = 50_000_000) -> Iterator[str]:
    """The texts of jsonl files (their `text_field`) and plain text files, up to `max_chars` characters in all."""
    seen = 0
    for path in paths:
        if not path.is_file():
            raise UserError(f"{path}: no such file; pass jsonl or text files to --input")
        with open(path, encoding="utf-8", errors="replace") as f:
            if path.suffix == ".jsonl":
                for line in f:
                    try:
                        text = json.loads(line).get(text_field, "")
                    except (json.JSONDecodeError, AttributeError):
                        continue
                    seen += len(text)
                    yield text
                    if seen >= max_chars:
                        return
            else:
                text = f.read(max_chars - seen)
                seen += len(text)
                yield text
        if seen >= max_chars:
            return


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: Path) -> Tokenizer:
    """Byte-level BPE with the Llama-3 split pattern; writes tokenizer.json and its config."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(TRAINED_SPECIALS) + 1:
        raise UserError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least {256 + len(TRAINED_SPECIALS) + 1}")
    hf = HFTokenizer(models.BPE(fuse_unk=False))
    hf.pre_tokenizer = _llama3_pre_tokenizer()
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=TRAINED_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    # Long texts in pieces cut where the split pattern cuts anyway: the same word counts, bounded memory.
    hf.train_from_iterator((piece for text in texts for piece in _pieces(text, CHUNK_CHARS)), trainer=trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "tokenizer.json"
    hf.save(str(raw))
    tok = Tokenizer.from_tokenizer_json(raw)
    tok.save(out_dir)
    return Tokenizer.from_tokenizer_json(raw)
