"""The `zagreus` lm-eval model against lm-eval's own `hf` model on the same export.

Same tokens, same log-likelihoods (within 1e-4), same acc / acc_norm; rolling log-likelihoods
and greedy generation with stop sequences agree too. The offline tasks build the same
documents as lm-eval's okapi code on the same records.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from zagreus.eval.scorer import score_pairs

BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "bench"
ITALIAN_WORDS = ("il calore si sposta dalla mano al cubetto di ghiaccio freddo acqua sole luna terra pianta "
                 "animale energia luce suono forza massa velocità tempo giorno notte vento pioggia").split()


pytestmark = pytest.mark.usefixtures("one_thread")


def okapi_items(n: int, seed: int = 0) -> list[dict]:
    """Okapi ARC records: the real Italian ones when the shared data is here, else made up."""
    if (BENCH / "m_arc_it_test.json").is_file():
        items = json.loads((BENCH / "m_arc_it_test.json").read_text(encoding="utf-8"))
        # Include the rare five-option items so option_e is exercised.
        five = [x for x in items if x.get("option_e")]
        return (five + items)[:n]
    rng = random.Random(seed)

    def sentence(k: int) -> str:
        return " ".join(rng.choice(ITALIAN_WORDS) for _ in range(k)).capitalize()

    return [{"id": f"made/{i}", "instruction": sentence(12) + "?", "answer": "ABCD"[i % 4],
             **{f"option_{c}": sentence(rng.randint(2, 9)) + "." for c in "abcd"}, "option_e": ""} for i in range(n)]


def write_arc_task_files(folder: Path, n_test: int = 24, n_val: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    items = okapi_items(n_test + n_val)
    (folder / "m_arc_it_test.json").write_text(json.dumps(items[:n_test], ensure_ascii=False), encoding="utf-8")
    (folder / "m_arc_it_validation.json").write_text(json.dumps(items[n_test:], ensure_ascii=False), encoding="utf-8")
    return folder


def build_export(folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A 2-layer d=64 random model on a small trained BPE, exported in the HF format."""
    from zagreus.model.config import ModelConfig
    from zagreus.model.hf import save_hf
    from zagreus.model.llama import Transformer
    from zagreus.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      intermediate_size=128, max_seq_len=256, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                      init_std=0.2)  # a wide init spreads the choices' scores, so no near-ties
    model = Transformer(cfg)
    model.init_weights(seed)
    save_hf(model, tok, folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from zagreus.tokenizer import train_bpe

    texts = [" ".join(str(v) for v in item.values()) for item in okapi_items(300, seed=1)]
    out = tmp_path_factory.mktemp("tok")
    train_bpe(texts * 3, 768, out)
    return out


@pytest.fixture(scope="module")
def export(tmp_path_factory, tokenizer_dir) -> Path:
    return build_export(tmp_path_factory.mktemp("export"), tokenizer_dir)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_arc_task_files(tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="module")
def hf_lm(export):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(export), batch_size=8, device="cpu")


@pytest.fixture(scope="module")
def our_lm(export):
    from zagreus.eval.lm import make_lm

    return make_lm(export, batch_size=8)  # HFLM's batch size: close calls are decided as HFLM at 8 decides them


def test_crosscheck_with_lm_eval_hf(our_lm, hf_lm, data_dir):
    from zagreus.eval.run import run_tasks

    ours, ours_raw = run_tasks(our_lm, ["zagreus_arc_it"], num_fewshot=1, data_dir=data_dir, log_samples=True)
    ref, ref_raw = run_tasks(hf_lm, ["zagreus_arc_it"], num_fewshot=1, data_dir=data_dir, log_samples=True)
    a, b = ours_raw["samples"]["zagreus_arc_it"], ref_raw["samples"]["zagreus_arc_it"]
    assert len(a) == len(b) == 24
    n_choices = 0
    for x, y in zip(a, b):
        assert x["doc_id"] == y["doc_id"]
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip((r[0] for r in x["resps"]), (r[0] for r in y["resps"])):
            assert abs(ll_a - ll_b) < 1e-4
            assert greedy_a == greedy_b
            n_choices += 1
    assert n_choices >= 4 * 24
    # The results say how many close items were re-scored in HFLM's layout; lm-eval's HFLM has no tiebreak.
    assert isinstance(ours["zagreus_arc_it"]["rescored"], int) and ours_raw["tiebreak"]["calibrated"] >= 16
    assert "rescored" not in ref["zagreus_arc_it"] and ref_raw["tiebreak"] is None
    m_ours, m_ref = ours["zagreus_arc_it"]["metrics"], ref["zagreus_arc_it"]["metrics"]
    assert m_ours["acc"] == m_ref["acc"] and m_ours["acc_norm"] == m_ref["acc_norm"]
    # acc and acc_norm pick different answers on some items, so both are really compared.
    assert sum(x["acc"] != x["acc_norm"] for x in a) > 0


def test_tokens_match_hflm(our_lm, hf_lm):
    for text in ["Question: Perché si scioglie?\nAnswer:", "<|begin_of_text|>ciao", "a <|im_start|> b", ""]:
        assert our_lm.tok_encode(text) == hf_lm.tok_encode(text)
    assert our_lm._encode_pair("Domanda: il sole ", "caldo") == hf_lm._encode_pair("Domanda: il sole ", "caldo")
    assert our_lm.prefix_token_id == hf_lm.prefix_token_id


def test_rolling_and_generation_match_hflm(our_lm, hf_lm):
    from lm_eval.api.instance import Instance

    texts = ["Il calore si sposta dalla mano al cubetto di ghiaccio. " * 3, "Luna e sole, giorno e notte."]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    for ours, ref in zip(our_lm.loglikelihood_rolling(rolling, True), hf_lm.loglikelihood_rolling(rolling, True)):
        assert ours == pytest.approx(ref, abs=1e-4)
    # Different lengths, decoded in one left-padded batch (batch size 4).
    prompts = ["Il calore si sposta", "Domanda: la luna e il sole, il giorno e la notte", "Vento"]

    def generate(lm, until: list[str]) -> list[str]:
        kwargs = {"until": until, "max_gen_toks": 12, "do_sample": False}
        return lm.generate_until([Instance("generate_until", {}, (p, dict(kwargs)), i)
                                  for i, p in enumerate(prompts)], True)

    free = generate(our_lm, ["@@never@@"])
    assert free == generate(hf_lm, ["@@never@@"])
    assert all(len(s) > 5 for s in free)
    # Stop on a string from the middle of the first free generation: both cut there.
    stop = free[0][3:5]
    ours = generate(our_lm, [stop, "@@never@@"])
    assert ours == generate(hf_lm, [stop, "@@never@@"])
    assert ours[0] == free[0][: free[0].index(stop)]


def test_scorer_shares_context_and_truncates_like_hflm(export):
    """Packed choices equal one full forward per (context, continuation), left-truncated."""
    from zagreus.model.hf import load_hf

    model = load_hf(export).eval()
    rng = random.Random(0)
    L = model.cfg.max_seq_len
    ctx = [model.cfg.bos_token_id] + [rng.randrange(300, 700) for _ in range(40)]
    long_ctx = [rng.randrange(300, 700) for _ in range(L + 30)]
    pairs = [(ctx, [rng.randrange(300, 700) for _ in range(k)]) for k in (1, 3, 7, 2)]
    pairs += [(ctx[:5], [401, 402]), (long_ctx, [rng.randrange(300, 700) for _ in range(6)])]
    got = score_pairs(model, pairs, batch_tokens=64).results()
    for (c, cont), (logp, greedy) in zip(pairs, got):
        inp = (list(c) + list(cont))[-(L + 1):][:-1]
        with torch.inference_mode():
            logits = model(torch.tensor([inp])).log_softmax(-1)[0, -len(cont):]
        want = logits.gather(1, torch.tensor(cont)[:, None]).sum().item()
        assert logp == pytest.approx(want, abs=1e-4)
        assert greedy == bool((logits.argmax(-1) == torch.tensor(cont)).all())


def test_tiled_projection_equals_whole_vocabulary_rows():
    """The CPU projection's vocabulary tiles (online log-sum-exp, running max of the other tokens) give the
    log-probs, argmax and gaps of one whole-vocabulary log_softmax, whatever the tile sizes,
    including a last tile narrower than the rest and targets on tile edges."""
    from types import SimpleNamespace

    from zagreus.eval.scorer import token_logprobs

    gen = torch.Generator().manual_seed(0)
    vocab, dim, n = 1000, 16, 150
    weight = torch.randn(vocab, dim, generator=gen)
    hidden = torch.randn(n, dim, generator=gen)
    # Most targets random, some the row's own argmax (greedy), some on tile edges.
    logits = hidden @ weight.T
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[::3] = logits.argmax(-1)[::3]
    targets[1::7] = torch.tensor([0, 127, 128, 255, 256, 999, 998] * 4)[: len(targets[1::7])]
    want_logp = logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]
    top2 = logits.topk(2, -1).values
    want_greedy = logits.argmax(-1) == targets
    picked = logits.gather(1, targets[:, None])[:, 0]
    want_gap = torch.where(want_greedy, top2[:, 0] - top2[:, 1], top2[:, 0] - picked)
    model = SimpleNamespace(lm_head=SimpleNamespace(weight=weight))
    for rows, block in ((64, 128), (7, 300), (150, 1000), (1, 999)):
        logp, greedy, gap = token_logprobs(model, hidden, targets, rows=rows, block=block)
        torch.testing.assert_close(logp, want_logp, atol=1e-5, rtol=0)
        assert torch.equal(greedy, want_greedy), (rows, block)
        torch.testing.assert_close(gap, want_gap, atol=1e-5, rtol=0)
    assert want_greedy.sum() >= n // 4 and (~want_greedy).sum() >= n // 2


def test_an_exact_tie_with_the_target_is_a_gap_of_zero_and_not_greedy():
    """Two vocabulary entries with the same weights tie exactly: a target that ties for the top is
    not greedy (argmax would pick one of the two by position) and has a gap of 0, so the tiebreak
    re-scores it whatever its bound; a target below a tied top keeps its gap to it."""
    from types import SimpleNamespace

    from zagreus.eval.scorer import token_logprobs

    gen = torch.Generator().manual_seed(1)
    vocab, dim, n = 300, 8, 40
    weight = torch.randn(vocab, dim, generator=gen) * 0.1
    hidden = torch.randn(n, dim, generator=gen).abs()
    a, b = 17, 200  # in different tiles for every block size below
    weight[a] = weight[b] = torch.full((dim,), 5.0)  # the top of every row, tied
    logits = hidden @ weight.T
    top_value = logits.max(-1).values
    assert torch.equal(logits[:, a], top_value) and torch.equal(logits[:, b], top_value)
    model = SimpleNamespace(lm_head=SimpleNamespace(weight=weight))
    for target in (a, b):
        for rows, block in ((64, 128), (7, 150), (40, 300)):
            _, greedy, gap = token_logprobs(model, hidden, torch.full((n,), target), rows=rows, block=block)
            assert not greedy.any() and torch.equal(gap, torch.zeros(n)), (target, rows, block)
    below = a + 1 + torch.arange(n)  # targets under the tied top (b is not among them)
    _, greedy, gap = token_logprobs(model, hidden, below, rows=16, block=64)
    want = top_value - logits.gather(1, below[:, None])[:, 0]
    assert not greedy.any() and (want > 0).all()
    torch.testing.assert_close(gap, want, atol=1e-5, rtol=0)


def test_offline_task_docs_equal_lm_eval_okapi(data_dir, tmp_path):
    """zagreus_arc_it and zagreus_hellaswag_it build lm-eval's okapi documents from the same records."""
    import datasets
    from lm_eval.tasks.okapi.arc_multilingual import utils as okapi_arc
    from lm_eval.tasks.okapi.hellaswag_multilingual import utils as okapi_hs

    from zagreus.eval.registry import task_manager, task_specs

    hs = [{"ctx_a": "Un uomo è sul tetto.", "ctx_b": "lui", "activity_label": "Tetto [title] rimozione",
           "endings": ["rimuove le tegole.", "salta [step] giù.", "dorme.", "canta."], "label": str(i % 4)}
          for i in range(3)]
    (tmp_path / "m_hellaswag_it_val.json").write_text(json.dumps(hs, ensure_ascii=False), encoding="utf-8")
    for f in data_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    tasks = task_manager().load(task_specs(["zagreus_arc_it", "zagreus_hellaswag_it"], tmp_path))["tasks"]
    raw_arc = datasets.load_dataset("json", data_files=str(tmp_path / "m_arc_it_test.json"), split="train")
    want_arc = list(okapi_arc.process_docs(raw_arc))
    got_arc = list(tasks["zagreus_arc_it"].test_docs())
    assert [(d["query"], d["choices"], d["gold"]) for d in got_arc] == \
        [(d["query"], d["choices"], d["gold"]) for d in want_arc]
    want_hs = list(okapi_hs.process_docs(datasets.Dataset.from_list(hs)))
    got_hs = list(tasks["zagreus_hellaswag_it"].validation_docs())
    assert [(d["query"], d["choices"], d["gold"]) for d in got_hs] == \
        [(d["query"], d["choices"], d["gold"]) for d in want_hs]
    assert got_hs[0]["query"] == "Tetto. rimozione: Un uomo è sul tetto. Lui"
