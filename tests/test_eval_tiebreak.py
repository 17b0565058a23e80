"""Close calls decided as lm-eval's HFLM decides them (zagreus.eval.tiebreak).

A small model is trained here on real text, then a multiple-choice task is built whose items
plant near-ties: for each context, the two candidate words (out of many) whose log-likelihoods,
raw or per character, lie closest, plus a duplicated choice (an exact tie). Our evaluator and
HFLM then run the task at the same batch size; their picks must agree item by item, and every
item inside the tiebreak's bound must carry HFLM's own numbers, bit for bit.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

HANDBOOK = Path(__file__).resolve().parents[2] / "shared" / "data" / "handbook-5lang.jsonl"
pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 8


def _texts() -> list[str]:
    if HANDBOOK.is_file():
        with HANDBOOK.open(encoding="utf-8") as f:
            return [json.loads(line)["text"] for _, line in zip(range(300), f)]
    rng = random.Random(0)
    words = ("the model reads text and learns which word comes next from many pages of the handbook "
             "il modello legge testo e impara quale parola viene dopo").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(40, 120))) for _ in range(300)]


@pytest.fixture(scope="module")
def trained_export(tmp_path_factory) -> Path:
    """A 2-layer d=64 model trained 150 steps on the texts, exported in the HF format."""
    from zagreus.model.config import ModelConfig
    from zagreus.model.hf import save_hf
    from zagreus.model.llama import Transformer
    from zagreus.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("tiebreak")
    texts = _texts()
    tok = train_bpe(texts, 512, root / "tokenizer")
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      intermediate_size=128, max_seq_len=128, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    model = Transformer(cfg)
    model.init_weights(0)
    ids = torch.tensor([t for text in texts for t in tok.encode(text, bos=True)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=gen)
        batch = torch.stack([ids[s:s + 65] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 5.0  # well below ln(512) = 6.2: it learned something
    save_hf(model.eval(), tok, root / "export")
    return root / "export"


def _closest_pair(values: list[float]) -> tuple[int, int]:
    order = sorted(range(len(values)), key=values.__getitem__)
    a, b = min(zip(order, order[1:]), key=lambda p: values[p[1]] - values[p[0]])
    return a, b


def plant_items(export: Path) -> list[dict]:
    """Per context: the raw-closest pair, the per-character-closest pair, and a duplicated choice."""
    from zagreus.eval.scorer import score_pairs
    from zagreus.model.hf import load_hf
    from zagreus.tokenizer import load_tokenizer

    model, tok = load_hf(export).eval(), load_tokenizer(str(export))
    texts = _texts()
    words = sorted({w for t in texts for w in t.split() if w.isalpha()})[:1500]
    rng = random.Random(1)
    items = []
    for text in rng.sample(texts, 12):
        query = " ".join(text.split()[:10])
        ctx = tok.encode(query, bos=True)
        conts = [" " + w for w in words]
        lls = score_pairs(model, [(ctx, tok.encode(c, bos=False)) for c in conts]).logprob
        by_ll = sorted(range(len(words)), key=lls.__getitem__)
        for a, b in (_closest_pair(lls), _closest_pair([ll / len(w) for ll, w in zip(lls, words)])):
            low = [i for i in by_ll if i not in (a, b)][:2]  # distractors far below the pair
            items.append({"query": query, "choices": [words[a], words[b], words[low[0]], words[low[1]]], "gold": 0})
        # An exact tie on top: the likeliest word of several tokens, twice.
        twice = next(words[i] for i in reversed(by_ll) if len(tok.encode(" " + words[i], bos=False)) > 1)
        items.append({"query": query, "choices": [words[by_ll[0]], twice, twice], "gold": 1})
    return items


def run_task(lm, path: Path) -> tuple[dict, list[dict]]:
    from lm_eval import simple_evaluate

    task = {"task": "planted_ties", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{query}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    out = simple_evaluate(model=lm, tasks=[task], log_samples=True, bootstrap_iters=0, verbosity=None)
    return out["results"]["planted_ties"], sorted(out["samples"]["planted_ties"], key=lambda s: s["doc_id"])


def picks(sample: dict) -> tuple[int, int]:
    """The argmax choice by raw log-likelihood and per character, as lm-eval computes them."""
    lls = [r[0][0] for r in sample["resps"]]
    chars = [len(c) for c in sample["doc"]["choices"]]
    raw = max(range(len(lls)), key=lambda i: (lls[i], -i))
    norm = max(range(len(lls)), key=lambda i: (lls[i] / chars[i], -i))
    return raw, norm


def test_planted_near_ties_decided_as_hflm(trained_export, tmp_path):
    from lm_eval.models.huggingface import HFLM

    from zagreus.eval.lm import make_lm

    path = tmp_path / "planted.json"
    path.write_text(json.dumps(plant_items(trained_export)), encoding="utf-8")
    ours = make_lm(trained_export, batch_size=BATCH)
    ours_metrics, ours_samples = run_task(ours, path)
    report = ours.take_tiebreak_report()
    hf_metrics, hf_samples = run_task(HFLM(pretrained=str(trained_export), batch_size=BATCH, device="cpu"), path)

    assert [picks(s) for s in ours_samples] == [picks(s) for s in hf_samples]
    assert [(s["acc"], s["acc_norm"]) for s in ours_samples] == [(s["acc"], s["acc_norm"]) for s in hf_samples]
    assert ours_metrics == hf_metrics

    # The plants are real near-ties: inside the bound on HFLM's own numbers, so each one must
    # have been re-scored and carry HFLM's log-likelihoods exactly.
    bound = report.per_token_bound
    near = 0
    for ours_s, hf_s in zip(ours_samples, hf_samples):
        lls = [r[0][0] for r in hf_s["resps"]]
        chars = [len(c) for c in hf_s["doc"]["choices"]]
        raw = sorted(range(len(lls)), key=lls.__getitem__)[-2:]
        norm = sorted(range(len(lls)), key=lambda i: lls[i] / chars[i])[-2:]
        raw_gap = lls[raw[1]] - lls[raw[0]]
        norm_gap = lls[norm[1]] / chars[norm[1]] - lls[norm[0]] / chars[norm[0]]
        # Top two within half the margin (the margin is at least twice the per-token bound):
        # far enough inside it that the fast pass must have flagged the item.
        if raw_gap <= bound or norm_gap <= bound / max(chars[i] for i in norm):
            near += 1
            assert ours_s["resps"] == hf_s["resps"], hf_s["doc"]
    assert near >= 12  # the duplicated choices alone give 12
    assert sum(report.rescored_items.values()) >= near
    assert report.rescored_requests < report.requests  # the rest kept the fast numbers

    # Without the tiebreak the fast pass's sums are not HFLM's (here 4 of 36 picks differed).
    _, fast_samples = run_task(make_lm(trained_export, batch_size=BATCH, tiebreak=False), path)
    assert sum(f["resps"] != h["resps"] for f, h in zip(fast_samples, hf_samples)) >= len(hf_samples) // 2


def test_widths_follow_hflm_batches(trained_export):
    """hflm_widths reproduces HFLM's padded widths: its scores equal HFLM's bit for bit for any
    subset, in any order, at two batch sizes (one-token choices sharing a context included)."""
    from lm_eval.models.huggingface import HFLM

    from zagreus.eval.tiebreak import hflm_scores, hflm_widths
    from zagreus.model.hf import load_hf
    from zagreus.tokenizer import load_tokenizer

    model, tok = load_hf(trained_export).eval(), load_tokenizer(str(trained_export))
    rng = random.Random(2)
    requests = []
    for text in rng.sample(_texts(), 10):
        words = text.split()
        ctx = tok.encode(" ".join(words[:rng.randint(3, 40)]), bos=True)
        for w in rng.sample(words, 3) + [" A", " B"]:
            requests.append(((None, w), ctx, tok.encode(" " + w.strip(), bos=False)))
    long_ctx = tok.encode(" ".join(_texts()[0].split() * 3), bos=True)[: model.cfg.max_seq_len + 20]
    requests.append(((None, "x"), long_ctx, tok.encode(" the end", bos=False)))
    for batch in (3, BATCH):
        want = HFLM(pretrained=str(trained_export), batch_size=batch, device="cpu")._loglikelihood_tokens(
            requests, disable_tqdm=True)
        widths = hflm_widths(requests, batch, model.cfg.max_seq_len)
        subset = rng.sample(range(len(requests)), 20)
        got = hflm_scores(model, requests, subset, widths, model.cfg.max_seq_len)
        assert {i: got[i] for i in subset} == {i: want[i] for i in subset}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("kv_heads", [2, 4])
@pytest.mark.parametrize("rope_scaling", [False, True])
def test_one_padded_row_is_transformers_llama_bit_for_bit(tied, kv_heads, rope_scaling):
    """The tiebreak re-scores with our model's plain forward: on one right-padded row its
    log-probabilities are those of transformers' LlamaForCausalLM holding the same weights,
    bit for bit, at several widths (tied or untied head, GQA or not, Llama-3 RoPE scaling)."""
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from zagreus.model.config import ModelConfig, RopeScaling
    from zagreus.model.hf import hf_names, to_llama_config
    from zagreus.model.llama import Transformer

    cfg = ModelConfig(vocab_size=512, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=kv_heads,
                      intermediate_size=128, max_seq_len=4096, tie_embeddings=tied,
                      rope_scaling=RopeScaling(original_max_position_embeddings=1024) if rope_scaling else None)
    model = Transformer(cfg)
    model.init_weights(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # far from init: larger activations, last bits that differ if any op does
    reference = LlamaForCausalLM(LlamaConfig(**to_llama_config(cfg))).float().eval()
    reference.load_state_dict({k: v.clone() for k, v in hf_names(model).items()}, strict=True)
    gen = torch.Generator().manual_seed(0)
    for width in (5, 64, 257, 1500):
        row = torch.randint(0, cfg.vocab_size, (1, width), generator=gen)
        row[0, width * 2 // 3:] = 0  # right padding, as HFLM pads
        with torch.inference_mode():
            ours = F.log_softmax(model.eval()(row), dim=-1)
            theirs = F.log_softmax(reference(row).logits, dim=-1)
        assert torch.equal(ours, theirs), (width, (ours - theirs).abs().max().item())
