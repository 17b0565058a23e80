"""Our Llama against transformers' LlamaForCausalLM on the same weights, the KV cache against
full forward passes, and the exact parameter counts of the presets."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from zagreus.model.config import resolve_model_config
from zagreus.model.llama import Transformer
from zagreus.model.generate import SamplingParams, generate
from zagreus.model.hf import save_hf

CASES = {
    "tiny-tied-gqa": dict(preset="tiny", vocab_size=512),
    "tiny-untied-mha": dict(preset="tiny", vocab_size=512, tie_embeddings=False, n_kv_heads=4),
    "tiny-rope-scaling": dict(
        preset="tiny", vocab_size=512, rope_theta=500000.0,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),
    # zagreus-0.4b's shapes (960 wide, 15 heads of 64, 5 KV heads, 2560 MLP) with 2 layers and a small vocabulary.
    "zagreus-0.4b-2-layers": dict(preset="zagreus-0.4b", n_layers=2, vocab_size=1024),
}


def _pair(case: str, tmp_path, tokenizer):
    overrides = dict(CASES[case])
    cfg = resolve_model_config(overrides.pop("preset"), **overrides)
    ours = Transformer(cfg)
    ours.init_weights(seed=1)
    out = tmp_path / case
    save_hf(ours, tokenizer, out)
    theirs = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return ours.eval(), theirs


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    from zagreus.tokenizer import train_bpe

    text = ["the quick brown fox jumps over the lazy dog " * 5, "la volpe veloce salta sopra il cane pigro " * 5]
    return train_bpe(text * 20, 300, tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path, small_tokenizer):
    ours, theirs = _pair(case, tmp_path, small_tokenizer)
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(tokens) - theirs(tokens).logits).abs().max().item()
    assert diff <= 1e-4, f"{case}: max abs logit difference {diff}"


@pytest.mark.parametrize("case", ["tiny-tied-gqa", "tiny-rope-scaling"])
def test_greedy_generation_matches_transformers(case, tmp_path, small_tokenizer):
    ours, theirs = _pair(case, tmp_path, small_tokenizer)
    prompt = [small_tokenizer.bos_id] + small_tokenizer.encode("the quick brown")
    mine = generate(ours, prompt, SamplingParams(max_new_tokens=32))
    with torch.no_grad():
        ids = torch.tensor([prompt])
        # No stop token: both sides must produce all 32 tokens.
        ref = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                              eos_token_id=None, pad_token_id=ours.cfg.vocab_size - 1)[0, len(prompt):].tolist()
    assert len(mine) == 32
    assert mine == ref


def test_kv_cache_matches_full_forward():
    from zagreus.model.llama import KVCache

    cfg = resolve_model_config("tiny", vocab_size=512)
    model = Transformer(cfg).eval()
    model.init_weights(seed=3)
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache.empty(cfg, 2, 40)
        # A prefill of 7 tokens, a chunk of 5, then one token at a time.
        pieces = [model(tokens[:, :7], cache=cache), model(tokens[:, 7:12], cache=cache)]
        pieces += [model(tokens[:, i : i + 1], cache=cache) for i in range(12, 40)]
    stepwise = torch.cat(pieces, dim=1)
    assert (stepwise - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "preset,total", [("zagreus-0.4b", 437_760_960), ("llama-3.2-1b", 1_235_814_400)]
)
def test_parameter_counts(preset, total):
    cfg = resolve_model_config(preset)
    assert cfg.param_counts()["total"] == total
    with torch.device("meta"):
        model = Transformer(cfg)
    # Tied weights are one Parameter, so parameters() counts them once.
    assert sum(p.numel() for p in model.parameters()) == total
