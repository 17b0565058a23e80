"""DPO's losses (`dpo.loss: sigmoid|ipo`, `dpo.label_smoothing`) against TRL's formulas, on tensors
and on a tiny model's log-probabilities computed TRL's way from plain logits; an IPO run starts at
its known first loss; the recipe refuses label smoothing outside the sigmoid loss.

`trl` is not installed in this environment, so TRL's code is transcribed below from its source
(github.com/huggingface/trl, trl/trainer/dpo_trainer.py): the "sigmoid" loss with label smoothing
from `DPOTrainer.dpo_loss` as it stood before the DPO refactor of v0.29 (commit e3b7897c8^), the
"ipo" loss from `DPOTrainer._compute_loss` at f2cd577 (v1.9: each side's summed log-ratio divided by
its completion's token count, clamped at 1), and the per-token log-probabilities of
`_compute_loss` (shifted logits, selective log-softmax, completion mask).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from zagreus.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

QA = [("Qual è la capitale d'Italia?", "Roma."), ("What colour is the sky?", "Blue, on a clear day."),
      ("Quanto fa due più due?", "Quattro."), ("Who wrote the Divine Comedy?", "Dante Alighieri."),
      ("Come si chiama il gatto?", "Il gatto si chiama Nerone."), ("Name a prime number.", "Seven.")]


# --- TRL, transcribed -----------------------------------------------------------------------
def trl_sigmoid(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, label_smoothing):
    """TRL DPOTrainer.dpo_loss, loss_type "sigmoid" (v0.28): conservative DPO with label smoothing."""
    logits = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
              - F.logsigmoid(-beta * logits) * label_smoothing)
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def trl_ipo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, completion_mask):
    """TRL DPOTrainer._compute_loss, loss_type "ipo" (v1.9), f_divergence_type reverse_kl; the batch is
    [chosen, rejected] and completion_mask [2B, T] marks the completions' tokens."""
    chosen_scores = chosen_logps - ref_chosen_logps
    rejected_scores = rejected_logps - ref_rejected_logps
    chosen_mask, rejected_mask = completion_mask.chunk(2, dim=0)
    chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)
    rejected_avg_score = rejected_scores / rejected_mask.sum(dim=1).clamp(min=1.0)
    ipo_delta = chosen_avg_score - rejected_avg_score
    return (ipo_delta - 1 / (2 * beta)) ** 2, beta * chosen_scores.detach(), beta * rejected_scores.detach()


def trl_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """TRL _compute_loss: summed log-probabilities of the completion tokens from plain logits."""
    shift_logits, shift_labels = logits[..., :-1, :], input_ids[..., 1:]
    shift_mask = completion_mask[..., 1:]
    per_token = torch.gather(shift_logits.log_softmax(-1), 2, shift_labels.unsqueeze(-1)).squeeze(-1)
    per_token[shift_mask == 0] = 0.0
    return per_token.sum(dim=1)


# --- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from zagreus.tokenizer import train_bpe

    return train_bpe([q + " " + a for q, a in QA] * 10, 400, tmp_path_factory.mktemp("bpe"))


def _model(tok, seed: int):
    from zagreus.model.config import resolve_model_config
    from zagreus.model.llama import build_model

    cfg = resolve_model_config("tiny", vocab_size=tok.vocab_size, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                               intermediate_size=128, max_seq_len=256, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    return build_model(cfg, seed=seed)


# --- the tests ------------------------------------------------------------------------------
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_sigmoid_loss_equals_trl(label_smoothing):
    from zagreus.post.dpo import dpo_loss

    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-30 * torch.rand(16, generator=g, dtype=torch.float64) for _ in range(4))
    ours = dpo_loss(pc, pr, rc, rr, 0.2, "sigmoid", label_smoothing)
    theirs = trl_sigmoid(pc, pr, rc, rr, 0.2, label_smoothing)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    if label_smoothing == 0.0:  # the default loss is today's plain DPO
        assert torch.allclose(ours[0], -F.logsigmoid(0.2 * ((pc - rc) - (pr - rr))), atol=1e-12, rtol=0)


def test_ipo_loss_equals_trl():
    from zagreus.post.dpo import dpo_loss

    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-30 * torch.rand(8, generator=g, dtype=torch.float64) for _ in range(4))
    completion_mask = torch.zeros(16, 40)
    lengths = torch.randint(1, 30, (16,), generator=g)
    for row, n in enumerate(lengths.tolist()):
        completion_mask[row, 5 : 5 + n] = 1
    for beta in (0.1, 0.5):
        ours = dpo_loss(pc, pr, rc, rr, beta, "ipo", chosen_tokens=lengths[:8], rejected_tokens=lengths[8:])
        theirs = trl_ipo(pc, pr, rc, rr, beta, completion_mask)
        for a, b in zip(ours, theirs):
            assert torch.allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_losses_on_a_model_equal_trl_from_logits(tok, loss):
    """Our path (chunked summed log-probs, token counts from the labels) against TRL's from plain logits."""
    from zagreus.post.datasets import preference_example
    from zagreus.post.common import Sequence
    from zagreus.post.dpo import Pair, completion_tokens, dpo_loss, pair_batch, pair_encoder, sequence_logprobs

    policy, reference = _model(tok, 3).double(), _model(tok, 4).double()
    rows = [{"prompt": q, "chosen": a, "rejected": "Non lo so, davvero."} for q, a in QA[:4]]
    encode = pair_encoder(tok, "chatml", 128)
    pairs = [Pair(*(Sequence(*seq) for seq in encode(preference_example(r, str(i)))[0])) for i, r in enumerate(rows)]
    tokens, labels = pair_batch(pairs, pad=0, device=torch.device("cpu"))
    beta, n = 0.1, len(pairs)
    with torch.no_grad():
        pol = sequence_logprobs(policy, tokens, labels, chunk_tokens=7)
        ref = sequence_logprobs(reference, tokens, labels, chunk_tokens=7)
        counts = completion_tokens(labels)
        ours = dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], beta, loss, 0.1 if loss == "sigmoid" else 0.0,
                        counts[:n], counts[n:])
        # TRL's view of the same batch: the completion mask marks input positions (ours are shifted targets).
        completion_mask = torch.zeros_like(tokens)
        completion_mask[:, 1:] = (labels[:, :-1] != -100).long()
        pol_trl = trl_logps(policy(tokens), tokens, completion_mask)
        ref_trl = trl_logps(reference(tokens), tokens, completion_mask)
    # The same log-probabilities (ours are summed in fp32) and the same token counts as TRL's.
    assert torch.allclose(pol.double(), pol_trl, atol=1e-4, rtol=0) and torch.allclose(ref.double(), ref_trl, atol=1e-4, rtol=0)
    assert torch.equal(counts, completion_mask.sum(1))
    # TRL's loss on those tensors.
    if loss == "sigmoid":
        theirs = trl_sigmoid(pol[:n], pol[n:], ref[:n], ref[n:], beta, 0.1)
    else:
        theirs = trl_ipo(pol[:n], pol[n:], ref[:n], ref[n:], beta, completion_mask)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a, b)
    assert float(ours[0].std()) > 0  # different pairs, different losses: not a trivial agreement


def _recipe(tmp_path: Path, init: Path, **dpo) -> Path:
    rows = [{"prompt": q, "chosen": a, "rejected": "Non lo so."} for q, a in QA]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "dpo-losses", "run_dir": str(tmp_path / "run"), "pretrain": {"loss_chunk": 64},
                                    "dpo": {"init": str(init), "datasets": [{"path": "prefs.jsonl"}], "seq_len": 128,
                                            "micro_batch": 3, "epochs": 10, "log_every": 1, "device": "cpu",
                                            "optimizer": {"lr": 3e-3, "weight_decay": 0.0},
                                            "schedule": {"kind": "constant", "warmup": 0}, **dpo}}))
    return path


def test_ipo_run_starts_at_its_target_and_learns(tok, tmp_path):
    from zagreus.model.hf import save_hf
    from zagreus.post.dpo import run_dpo
    from zagreus.recipe import load_recipe

    init = save_hf(_model(tok, 0), tok, tmp_path / "init")
    beta = 0.5
    run_dpo(load_recipe(_recipe(tmp_path, init, loss="ipo", beta=beta)))
    out = tmp_path / "run" / "dpo"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Step 1: the policy is the reference, h = 0, so the loss is (0 - 1/(2 beta))^2.
    assert records[0]["loss"] == pytest.approx(1 / (4 * beta**2), abs=1e-6)
    assert records[0]["margins"] == pytest.approx(0.0, abs=1e-5)
    assert records[-1]["loss"] < 0.5 * records[0]["loss"] and records[-1]["accuracy"] == 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loss_type"] == "ipo" and summary["beta"] == beta and summary["label_smoothing"] == 0.0


def test_label_smoothing_only_with_sigmoid(tmp_path):
    from zagreus.recipe import load_recipe

    with pytest.raises(UserError) as info:
        load_recipe(_recipe(tmp_path, tmp_path, loss="ipo", label_smoothing=0.1))
    assert "label_smoothing applies to loss: sigmoid only" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UserError) as info:
        load_recipe(_recipe(tmp_path, tmp_path, label_smoothing=0.5))
    assert "dpo.label_smoothing" in str(info.value)
    with pytest.raises(UserError) as info:
        load_recipe(_recipe(tmp_path, tmp_path, loss="hinge"))
    assert "dpo.loss" in str(info.value)
    recipe = load_recipe(_recipe(tmp_path, tmp_path, label_smoothing=0.1))
    assert recipe.dpo.loss == "sigmoid" and math.isclose(recipe.dpo.label_smoothing, 0.1)
