"""GGUF files run by llama.cpp (through llama-cpp-python) behind the serving engine, so that
`zagreus chat` and `zagreus serve --gguf FILE` try the edge artefact with the same commands.

llama-cpp-python is optional: it builds llama.cpp from source when installed (see the README's
Release section), so it is imported only here, with one line saying how to get it.

`LlamaCppModel` stands where the engine expects our `Transformer`: generate_stream and the
interleaving scheduler call it with a batch of one sequence and a KV cache object, and it answers
with the logits of the last position. llama.cpp keeps the real KV cache; ours only counts the
positions fed so far (its `length`), so a cache of length 0 starts a new sequence. One llama.cpp
context holds one sequence, so a GGUF engine runs one request at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from zagreus.errors import UserError
from zagreus.model.config import ModelConfig
from zagreus.post.chat import template_of
from zagreus.rundir import is_export
from zagreus.serve.engine import Engine
from zagreus.tokenizer import load_tokenizer

INSTALL = "pip install llama-cpp-python (it builds llama.cpp from source: a C++ compiler and CMake are needed)"


def open_llama(path: str | Path, n_ctx: int = 0, n_threads: int | None = None, logits_all: bool = False):
    """A llama_cpp.Llama over the GGUF `path` (n_ctx 0: the model's own context)."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"running a GGUF needs llama-cpp-python: {INSTALL}") from None
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--gguf {path}: no such file; pass a .gguf written by `zagreus export --format gguf`")
    try:
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=n_threads, logits_all=logits_all, verbose=False)
    except ValueError as exc:  # llama-cpp-python's answer to a file llama.cpp cannot load
        raise UserError(f"--gguf {path}: llama.cpp cannot load it ({exc})") from None


class LlamaCppModel:
    """A llama.cpp model with the calling convention of zagreus.model.llama.Transformer for decoding."""

    def __init__(self, llm) -> None:
        import llama_cpp

        self.llm = llm
        self._logits_of = llama_cpp.llama_get_logits_ith
        self.n_vocab = llm.n_vocab()
        # The Decoder sizes its KV cache from cfg and takes device and dtype from a parameter;
        # llama.cpp holds the real cache, so ours is one layer of one 2-wide head that counts positions.
        self.cfg = ModelConfig(vocab_size=self.n_vocab, hidden_size=2, n_layers=1, n_heads=1, n_kv_heads=1,
                               intermediate_size=1, max_seq_len=llm.n_ctx())
        self._param = torch.zeros(())
        self._cache = None

    def eval(self) -> "LlamaCppModel":
        return self

    def parameters(self):
        yield self._param

    def __call__(self, tokens: torch.Tensor, positions=None, mask=None, cache=None) -> torch.Tensor:
        """Logits [1, 1, vocab] of the last of `tokens` [1, T], fed after the `cache.length` before them."""
        if tokens.shape[0] != 1 or mask is not None or cache is None:
            raise ValueError("llama.cpp decodes one sequence at a time, with its cache")
        if cache.length == 0:
            self.llm.reset()
        elif cache is not self._cache:
            raise ValueError("llama.cpp holds one sequence; another one was fed in between")
        self._cache = cache
        self.llm.eval(tokens[0].tolist())
        cache.length += tokens.shape[1]
        logits = np.ctypeslib.as_array(self._logits_of(self.llm.ctx, -1), shape=(self.n_vocab,))
        return torch.from_numpy(logits.copy())[None, None]


def open_gguf_engine(gguf: Path, model: Path, template: str | None = None, name: str | None = None,
                     batch: bool = False) -> Engine:
    """An engine running the GGUF `gguf` through llama.cpp, with the tokenizer and chat template of
    the export (or release) folder `model`; requests run one at a time."""
    model = Path(model)
    if batch:
        raise UserError("--batch: llama.cpp runs a GGUF one request at a time; leave --batch out with --gguf")
    if not is_export(model):
        raise UserError(f"{model}: with --gguf, MODEL is the export or release folder the GGUF was written from "
                        f"(its tokenizer and chat template)")
    llm = open_llama(gguf)
    return Engine(LlamaCppModel(llm), load_tokenizer(str(model)), template_of(model, template),
                  name or Path(gguf).stem, max_active=1)
