"""The incremental Decoder: a batch of one computes exactly the plain KV-cache loop; rows of
different lengths, prefilled together or joining and leaving between steps, decode as they do alone."""

from __future__ import annotations

import pytest
import torch

from zagreus.model.config import resolve_model_config
from zagreus.model.generate import Decoder, Sampler, SamplingParams, generate, generate_stream
from zagreus.model.llama import KVCache, Transformer

VOCAB = 300


@pytest.fixture(scope="module")
def model():
    cfg = resolve_model_config("tiny", vocab_size=VOCAB, max_seq_len=96, init_std=0.3)
    model = Transformer(cfg).eval()
    model.init_weights(seed=1)
    return model


def _prompts(*lengths: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


@torch.inference_mode()
def _plain_logits(model, prompt: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """Next-position logits of the prompt and after each fed token: the model and a cache, nothing else
    (the prompt's last position alone through the output matrix, as the Decoder and HF's generate do)."""
    cache = KVCache.empty(model.cfg, 1, len(prompt) + len(tokens) + 1)
    out = [model.lm_head(model(torch.tensor([prompt]), cache=cache, return_hidden=True)[:, -1])[0]]
    out += [model(torch.tensor([[t]]), cache=cache)[0, -1] for t in tokens]
    return out


def test_batch_of_one_is_the_plain_cache_loop(model):
    prompt = _prompts(11)[0]
    tokens = generate(model, prompt, SamplingParams(max_new_tokens=20))
    assert len(tokens) == 20
    decoder = Decoder(model)
    got = [decoder.prefill([prompt], [20])[0]] + [decoder.step([t])[0] for t in tokens]
    assert all(torch.equal(a, b) for a, b in zip(got, _plain_logits(model, prompt, tokens)))


def test_rows_of_different_lengths_decode_as_alone(model):
    """Left-padded prefill, then rows leaving (at their own budgets) and one joining mid-way."""
    prompts = _prompts(5, 17, 1, 30, 9)
    budgets = [12, 4, 9, 12, 7]
    alone = [generate(model, p, SamplingParams(max_new_tokens=b)) for p, b in zip(prompts, budgets)]
    decoder = Decoder(model)
    rows = [0, 1, 2, 3]  # prompt 4 joins after three steps
    logits = decoder.prefill([prompts[i] for i in rows], [budgets[i] for i in rows])
    out: list[list[int]] = [[] for _ in prompts]
    for step in range(12):
        tokens = [int(logits[k].argmax()) for k in range(len(rows))]
        for k, i in enumerate(rows):
            out[i].append(tokens[k])
        live = [k for k, i in enumerate(rows) if len(out[i]) < budgets[i]]
        rows, tokens = [rows[k] for k in live], [tokens[k] for k in live]
        decoder.keep(live)
        if step == 2:
            joined = decoder.prefill([prompts[4]], [budgets[4]])
            rows.append(4)
            out[4].append(int(joined[0].argmax()))
            tokens.append(out[4][-1])
        if not rows:
            break
        logits = decoder.step(tokens)
        # Still the solo logits within rounding.
        for k, i in enumerate(rows):
            ref = _plain_logits(model, prompts[i], out[i])[-1]
            assert torch.allclose(logits[k], ref, atol=1e-4), (step, i)
    assert out == alone
    assert len(decoder) == 0


def test_seeded_rows_sample_as_alone(model):
    """Each row has its own generator: a seeded reply does not depend on its batch mates."""
    prompts = _prompts(6, 14, 3)
    params = [SamplingParams(max_new_tokens=10, temperature=0.9, top_k=40, seed=s) for s in (1, 2, 3)]
    alone = [list(generate_stream(model, p, q)) for p, q in zip(prompts, params)]
    decoder = Decoder(model)
    samplers = [Sampler(p, q, 10, decoder.device) for p, q in zip(prompts, params)]
    logits = decoder.prefill(prompts, [10, 10, 10])
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(10):
        tokens = [s.pick(logits[k]) for k, s in enumerate(samplers)]
        for o, t in zip(out, tokens):
            o.append(t)
        if not samplers[0].left:
            break
        logits = decoder.step(tokens)
    assert out == alone


def test_prompts_that_do_not_fit(model):
    with pytest.raises(ValueError, match="empty prompt"):
        Decoder(model).prefill([[]], [1])
    with pytest.raises(ValueError, match="does not fit"):
        generate(model, [1] * 96, SamplingParams())
