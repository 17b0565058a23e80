"""Export -> import -> export is bit-identical, and transformers loads the export with no custom code."""

from __future__ import annotations

import filecmp
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from zagreus.model.config import resolve_model_config
from zagreus.model.llama import Transformer
from zagreus.model.hf import load_hf, save_hf
from zagreus.tokenizer import load_tokenizer, train_bpe

EXPORT_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]


def test_export_import_export_is_bit_identical(tmp_path):
    tok = train_bpe(["una frase italiana e una English sentence"] * 30, 300, tmp_path / "tok")
    cfg = resolve_model_config("tiny", vocab_size=320, tie_embeddings=False,
                               rope_scaling={"factor": 4.0, "original_max_position_embeddings": 128})
    model = Transformer(cfg)
    model.init_weights(seed=7)
    save_hf(model, tok, tmp_path / "a")
    again = load_hf(tmp_path / "a")
    save_hf(again, load_tokenizer(str(tmp_path / "a")), tmp_path / "b")
    for name in EXPORT_FILES:
        assert filecmp.cmp(tmp_path / "a" / name, tmp_path / "b" / name, shallow=False), name
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_a_loaded_tied_model_shares_one_embedding_and_trains_like_the_original(tmp_path):
    """load_hf assigns the file's tensors (no copy): the tied head must stay the embedding's own
    parameter, so that a fine-tune of the export moves both together, and RoPE's buffer is real."""
    tok = train_bpe(["una frase italiana e una English sentence"] * 30, 300, tmp_path / "tok")
    cfg = resolve_model_config("tiny", vocab_size=320, tie_embeddings=True)
    model = Transformer(cfg)
    model.init_weights(seed=3)
    save_hf(model, tok, tmp_path / "a")
    again = load_hf(tmp_path / "a")
    assert again.lm_head.weight is again.embed_tokens.weight
    assert len(list(again.parameters())) == len(list(model.parameters()))
    assert torch.equal(again.inv_freq, model.inv_freq)
    batch = torch.randint(0, 320, (2, 16))
    for m in (model, again):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m(batch).logsumexp(-1).mean().backward()
        opt.step()
    assert torch.equal(again.embed_tokens.weight, model.embed_tokens.weight)
    assert torch.equal(again(batch), model(batch))


def test_transformers_auto_classes_load_export(tmp_path):
    out = tmp_path / "init"
    # The CLI verb, as a user runs it: a random zagreus-0.4b-shaped model with 2 layers via a recipe.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nmodel: {preset: zagreus-0.4b, overrides: {n_layers: 2}}\n")
    subprocess.run([sys.executable, "-m", "zagreus.cli", "model", "init", str(recipe), "--out", str(out), "--seed", "3"],
                   check=True, capture_output=True)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == resolve_model_config(
        "zagreus-0.4b", n_layers=2).param_counts()["total"]
    ours = load_hf(out)
    ids = tokenizer("Il modello zagreus parla italiano.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert (ours(ids) - model(ids).logits).abs().max().item() <= 1e-4
