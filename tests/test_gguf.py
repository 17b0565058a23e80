"""GGUF export (zagreus.release.gguf), checked against implementations that are not ours.

transformers reads a GGUF with its own loader (config from the metadata, q/k rows permuted back,
q8_0 dequantized, the tokenizer rebuilt from the vocabulary and merges); llama.cpp (through
llama-cpp-python, when installed: `make edge-check`) runs it.

The model is the small one trained on 300 handbook pages in test_eval_tiebreak (tied embeddings, a
BPE trained on those pages), then fitted on ten passages of them so that its greedy continuations
of their first 24 tokens are decided: unfitted, a model this small has top-2 logit gaps of 0.001 to
0.01 somewhere in most 32-token continuations, below q8_0's own logit error (about 0.004 on
average, 0.03 at most, on logits of spread 2.3), so those comparisons would test the ties rather
than the file. A random untied model with Llama-3 RoPE scaling covers the tensors that one lacks;
the fitted chat model of test_serve_end_to_end covers `zagreus chat --gguf`. Held-out text is the
pages after the first 300 (Spanish, French, Portuguese).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from test_eval_tiebreak import trained_export  # noqa: F401  (a module fixture)
from test_serve_end_to_end import CIAO, HELLO, TRAINED, export_dir  # noqa: F401  (export_dir is a module fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

try:
    import llama_cpp  # noqa: F401
    HAVE_LLAMA_CPP = True
except ImportError:
    HAVE_LLAMA_CPP = False
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed (make edge-check installs it)")


def _docs(handbook: Path) -> list[str]:
    with handbook.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def docs(handbook_path) -> list[str]:
    return _docs(handbook_path)


@pytest.fixture(scope="module")
def passages(docs, trained_export) -> torch.Tensor:
    """Ten 56-token passages (BOS first) from the middle of training pages long enough to hold one."""
    from zagreus.tokenizer import load_tokenizer

    tok = load_tokenizer(str(trained_export))
    long = [ids for ids in tok.encode_batch(docs[:300]) if len(ids) > 400]
    return torch.tensor([[tok.bos_id] + ids[300:355] for ids in long[:: len(long) // 10][:10]])


@pytest.fixture(scope="module")
def trained(trained_export):
    from zagreus.checkpoint import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(trained_export)
    return model.eval(), tok


@pytest.fixture(scope="module")
def ours(trained_export, passages):
    """The trained model fitted on the passages (see the module docstring)."""
    from zagreus.checkpoint import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(trained_export)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(model(passages[:, :-1]).flatten(0, 1), passages[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.05
    return model.eval(), tok


@pytest.fixture(scope="module")
def held_out(docs, trained) -> list[list[int]]:
    """Eight windows of the model's context from pages it was not trained on (BOS first)."""
    model, tok = trained
    ids = [t for text in docs[300:] for t in tok.encode(text, bos=True)]
    n = model.cfg.max_seq_len
    return [ids[i * 997: i * 997 + n] for i in range(8)]


@pytest.fixture(scope="module")
def gguf_files(ours, tmp_path_factory) -> dict[str, Path]:
    from zagreus.release.gguf import write_gguf

    model, tok = ours
    root = tmp_path_factory.mktemp("gguf")
    return {q: write_gguf(model, tok, root / f"m-{q}.gguf", q) for q in ("f16", "q8_0", "q4_0")}


def _transformers_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _tensor_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@torch.no_grad()
def test_f16_logits_equal_transformers(trained, held_out, tmp_path):
    """On the unfitted model: the fitted one's logits reach 15 in size, where f16 weights alone move them by up to 0.015."""
    from zagreus.release.gguf import write_gguf

    model, tok = trained
    path = write_gguf(model, tok, tmp_path / "trained.gguf", "f16")
    hf = _transformers_model(path)
    assert hf.config.tie_word_embeddings and "output.weight" not in _tensor_types(path)
    batch = torch.tensor(held_out[:4])
    diff = (model(batch) - hf(batch).logits).abs().max().item()
    assert diff <= 1e-2, diff


@torch.no_grad()
def test_untied_f16_logits_equal_transformers(trained, tmp_path):
    """Untied: output.weight is written and transformers unties; a file without it would give other logits."""
    from zagreus.model.llama import Transformer
    from zagreus.release.gguf import write_gguf

    base, tok = trained
    model = Transformer(base.cfg.model_copy(update={"tie_embeddings": False, "init_std": 0.1}))
    model.init_weights(seed=5)
    path = write_gguf(model.eval(), tok, tmp_path / "untied.gguf", "f16")
    hf = _transformers_model(path)
    assert not hf.config.tie_word_embeddings
    ids = torch.tensor([tok.encode("Il pacchetto si installa con apt install, poi si configura.", bos=True)])
    diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-2, diff


@torch.no_grad()
def test_q8_0_greedy_equals_ours(ours, gguf_files, passages):
    from zagreus.model.generate import SamplingParams, generate

    model, _ = ours
    types = _tensor_types(gguf_files["q8_0"])
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0"
    hf = _transformers_model(gguf_files["q8_0"])
    same = 0
    for prompt in passages[:, :24].tolist():
        mine = generate(model, prompt, SamplingParams(max_new_tokens=32))
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, len(prompt):]
        same += mine == theirs.tolist()
    assert same >= 9, same


@pytest.fixture(scope="module")
def llama3_gguf(tmp_path_factory, llama3_tokenizer) -> Path:
    """A one-layer model over the Llama-3 vocabulary: only its tokenizer is looked at."""
    from zagreus.model.config import ModelConfig
    from zagreus.model.llama import Transformer
    from zagreus.release.gguf import write_gguf

    cfg = ModelConfig(vocab_size=llama3_tokenizer.vocab_size, hidden_size=32, n_layers=1, n_heads=1, n_kv_heads=1,
                      intermediate_size=32)
    return write_gguf(Transformer(cfg), llama3_tokenizer, tmp_path_factory.mktemp("llama3") / "llama3.gguf", "f16")


@pytest.fixture(params=["llama3", "trained-bpe"], scope="module")
def tokenizer_case(request, llama3_tokenizer, llama3_gguf, ours, gguf_files):
    """(our tokenizer, its GGUF, the tokenizer.ggml.pre it must carry)."""
    if request.param == "llama3":
        return llama3_tokenizer, llama3_gguf, "llama-bpe"
    return ours[1], gguf_files["f16"], "smaug-bpe"


def test_tokenizer_read_back_by_transformers(tokenizer_case, docs):
    from transformers import AutoTokenizer

    tok, path, _ = tokenizer_case
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert theirs("ciao").input_ids[0] == tok.bos_id  # BOS added, as our documents start
    encoded = theirs(docs, add_special_tokens=False).input_ids
    assert [i for i, (a, b) in enumerate(zip(tok.encode_batch(docs), encoded)) if a != b] == []


def test_chat_template_and_end_of_turn(export_dir, tmp_path):
    """The GGUF carries the chat template (rendered by transformers' Jinja as we render it, tools
    included) and names <|im_end|> as end of turn."""
    import gguf
    from transformers import AutoTokenizer

    from zagreus.checkpoint import load_model_and_tokenizer
    from zagreus.post.chat import render, saved_chat_template
    from zagreus.release.gguf import write_gguf

    model, tok = load_model_and_tokenizer(export_dir)
    path = write_gguf(model, tok, tmp_path / "chat.gguf", "f16", chat_template=saved_chat_template(export_dir),
                      template="chatml")
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.eot_token_id"].contents() == tok.special_tokens["<|im_end|>"]
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for messages, tools in TRAINED:
        ids = theirs.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=False)
        assert ids == render(messages, tok, tools=tools).ids


def test_release_lists_its_ggufs(trained_export, tmp_path):
    from zagreus.release.publish import release

    out = release(trained_export, tmp_path / "release", gguf=["q8_0", "q4_0"])
    listing = json.loads((out / "gguf.json").read_text())
    assert [e["quant"] for e in listing] == ["q8_0", "q4_0"]
    card = (out / "README.md").read_text()
    for entry in listing:
        path = out / entry["file"]
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["file"] in card and entry["sha256"] in card
    assert f"llama-cli -m {listing[0]['file']}" in card and f"FROM ./{listing[0]['file']}" in card
    assert _tensor_types(out / listing[1]["file"])["blk.0.ffn_up.weight"] == "Q4_0"
    # A release without --gguf drops the files of the earlier one, made from other weights.
    release(trained_export, out)
    assert not (out / "gguf.json").exists() and not list(out.glob("*.gguf")) and "## GGUF" not in (out / "README.md").read_text()


def test_gguf_needs_llama_cpp_in_one_line(monkeypatch, gguf_files):
    import sys

    from zagreus.errors import UserError
    from zagreus.serve.llama_cpp import open_llama

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what an absent package looks like to import
    with pytest.raises(UserError, match="needs llama-cpp-python: pip install llama-cpp-python"):
        open_llama(gguf_files["f16"])


# --- llama.cpp itself ----------------------------------------------------------------------------
def _llama(path: Path, **kwargs):
    from zagreus.serve.llama_cpp import open_llama

    return open_llama(path, n_threads=1, **kwargs)


@needs_llama_cpp
def test_llama_cpp_tokenizer(tokenizer_case, docs):
    tok, path, pre = tokenizer_case
    llm = _llama(path)
    try:
        assert llm.metadata["tokenizer.ggml.pre"] == pre
        theirs = [llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) for text in docs]
    finally:
        llm.close()
    assert [i for i, (a, b) in enumerate(zip(tok.encode_batch(docs), theirs)) if a != b] == []


@needs_llama_cpp
def test_llama_cpp_greedy_equals_ours(ours, gguf_files, passages):
    from zagreus.model.generate import SamplingParams, generate
    from zagreus.serve.llama_cpp import LlamaCppModel

    model, _ = ours
    llm = _llama(gguf_files["f16"])
    try:
        runner = LlamaCppModel(llm)
        for prompt in passages[:, :24].tolist():
            params = SamplingParams(max_new_tokens=32)
            assert generate(runner, prompt, params) == generate(model, prompt, params)
    finally:
        llm.close()


def _perplexity(logits: torch.Tensor, window: list[int]) -> float:
    """exp of the mean next-token NLL of `window` from its logits [len(window), vocab]."""
    target = torch.tensor(window[1:])
    return torch.nn.functional.cross_entropy(logits[:-1].float(), target).exp().item()


@needs_llama_cpp
def test_llama_cpp_perplexity(ours, gguf_files, held_out):
    model, _ = ours
    with torch.no_grad():
        mine = sum(_perplexity(model(torch.tensor([w]))[0], w) for w in held_out) / len(held_out)
    found = {}
    for quant in ("f16", "q8_0"):
        llm = _llama(gguf_files[quant], n_ctx=model.cfg.max_seq_len, logits_all=True)
        try:
            total = 0.0
            for window in held_out:
                llm.reset()
                llm.eval(window)
                total += _perplexity(torch.from_numpy(llm.scores[: len(window)].copy()), window)
        finally:
            llm.close()
        found[quant] = total / len(held_out)
    assert abs(found["f16"] / mine - 1) < 0.01, (mine, found)
    assert abs(found["q8_0"] / mine - 1) < 0.05, (mine, found)


@needs_llama_cpp
def test_llama_cpp_untied_with_llama3_rope_scaling(ours, tmp_path):
    """rope_freqs and output.weight: llama.cpp's logits at every position equal ours, by a margin far
    smaller than what the scaling changes."""
    from zagreus.model.config import RopeScaling
    from zagreus.model.llama import Transformer
    from zagreus.release.gguf import write_gguf

    _, tok = ours
    scaled = ours[0].cfg.model_copy(update={
        "tie_embeddings": False, "init_std": 0.1,
        "rope_scaling": RopeScaling(factor=4.0, original_max_position_embeddings=32)})
    model = Transformer(scaled)
    model.init_weights(seed=9)
    plain = Transformer(scaled.model_copy(update={"rope_scaling": None}))
    plain.load_state_dict(model.state_dict())
    path = write_gguf(model.eval(), tok, tmp_path / "scaled.gguf", "f16")
    assert "rope_freqs.weight" in _tensor_types(path) and "output.weight" in _tensor_types(path)
    ids = tok.encode(" ".join(["Debian usa apt per installare i pacchetti e dpkg per gestirli."] * 8), bos=True)
    ids = ids[: scaled.max_seq_len]
    llm = _llama(path, n_ctx=scaled.max_seq_len, logits_all=True)
    try:
        llm.eval(ids)
        theirs = torch.from_numpy(llm.scores[: len(ids)].copy())
    finally:
        llm.close()
    with torch.no_grad():
        mine, unscaled = model(torch.tensor([ids]))[0], plain.eval()(torch.tensor([ids]))[0]
    diff = (mine - theirs).abs().max().item()
    assert diff <= 1e-2, diff
    assert (mine - unscaled).abs().max().item() > 10 * max(diff, 1e-2)  # the scaling shows in the logits


@needs_llama_cpp
def test_chat_through_llama_cpp(export_dir, tmp_path):
    """`zagreus chat MODEL --gguf FILE`'s engine: the fitted chat model's known answers, from llama.cpp."""
    from zagreus.checkpoint import load_model_and_tokenizer
    from zagreus.model.generate import SamplingParams
    from zagreus.post.chat import saved_chat_template
    from zagreus.release.gguf import write_gguf
    from zagreus.serve.chat_cli import chat_loop
    from zagreus.serve.llama_cpp import open_gguf_engine

    model, tok = load_model_and_tokenizer(export_dir)
    path = write_gguf(model, tok, tmp_path / "chat.gguf", "f16", chat_template=saved_chat_template(export_dir),
                      template="chatml")
    engine = open_gguf_engine(path, export_dir)
    lines = iter(["Say hello\n", "/reset\n", "Ciao, come stai?\n", ""])
    out: list[str] = []
    try:
        chat_loop(engine, SamplingParams(max_new_tokens=40), lambda: next(lines), out.append)
    finally:
        engine.model.llm.close()
    assert "".join(out) == f"{HELLO}\n(conversation reset)\n{CIAO}\n"
