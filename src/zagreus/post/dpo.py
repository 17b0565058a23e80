"""Direct Preference Optimization (Rafailov et al. 2023) with the sigmoid loss.

loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

where log pi(y) is the summed log-probability of the completion's assistant tokens (end-of-turn
included) given the prompt. The reference model is the starting model itself: its sequence
log-probabilities are computed once, before the first update, and kept as two floats per pair,
so no frozen copy of the model lives in memory during training.

Logged per step: loss, rewards (chosen, rejected: beta x log-ratio), margins and accuracy
(share of pairs whose chosen reward beats the rejected one). Output: runs/<name>/dpo/export/,
metrics.jsonl, summary.json.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from zagreus.errors import UserError
from zagreus.post.common import (
    IGNORE, Metrics, Sequence, autocast, export, open_stage, tokenization_report, pad_id, padded_batch, to_sequence,
)

log = logging.getLogger(__name__)


@dataclass
class Pair:
    chosen: Sequence
    rejected: Sequence


def tokenize_pair(ex, tokenizer, template: str, seq_len: int) -> tuple[Pair, bool]:
    """Render prompt+chosen and prompt+rejected; only the completion's assistant tokens are trained."""
    from zagreus.post.chat import render

    prompt_len = len(render(ex.prompt, tokenizer, template, tools=ex.tools).ids)
    seqs, cut = [], False
    for completion in (ex.chosen, ex.rejected):
        full = render(ex.prompt + completion, tokenizer, template, tools=ex.tools)
        # Every turn ends in a special token, so the prompt's ids are a prefix of the full ones.
        trained = [m and i >= prompt_len for i, m in enumerate(full.assistant_mask)]
        seq, truncated = to_sequence(full.ids, trained, seq_len)
        seqs.append(seq)
        cut |= truncated
    return Pair(*seqs), cut


def tokenize_pairs(examples, tokenizer, template: str, seq_len: int) -> tuple[list[Pair], dict]:
    pairs, truncated, empty = [], 0, 0
    for ex in examples:
        pair, cut = tokenize_pair(ex, tokenizer, template, seq_len)
        truncated += cut
        if all(x == IGNORE for x in pair.chosen.labels) or all(x == IGNORE for x in pair.rejected.labels):
            empty += 1
            continue
        pairs.append(pair)
    return pairs, tokenization_report("pair", len(pairs), truncated, empty, seq_len)


def sequence_logprobs(model, tokens: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 4096) -> torch.Tensor:
    """Summed log-probability of the labelled targets of each row ([B]); padding is on the right."""
    from zagreus.train.losses import token_logprobs

    hidden = model(tokens, return_hidden=True)
    lp = token_logprobs(hidden, model.lm_head.weight, labels, chunk_tokens, ignore_index=IGNORE)
    return lp.float().sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair sigmoid DPO loss and the implicit rewards of chosen and rejected."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_reward - rejected_reward)
    return loss, chosen_reward.detach(), rejected_reward.detach()


def pair_batch(pairs: list[Pair], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen sequences first, then rejected, in one padded batch (one forward pass for both)."""
    return padded_batch([p.chosen for p in pairs] + [p.rejected for p in pairs], pad, device)


@torch.no_grad()
def reference_logprobs(model, pairs: list[Pair], micro_batch: int, pad: int, device: torch.device,
                       chunk_tokens: int = 4096) -> torch.Tensor:
    """[N, 2] (chosen, rejected) log-probabilities of every pair under the model as it is now."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    out = torch.empty(len(pairs), 2, dtype=torch.float64)
    for start in tqdm(range(0, len(pairs), micro_batch), desc="dpo reference", unit="batch", disable=None):
        chunk = pairs[start : start + micro_batch]
        tokens, labels = pair_batch(chunk, pad, device)
        with autocast(device):
            lp = sequence_logprobs(model, tokens, labels, chunk_tokens).double().cpu()
        n = len(chunk)
        out[start : start + n, 0] = lp[:n]
        out[start : start + n, 1] = lp[n:]
    model.train(was_training)
    return out


def run_dpo(recipe, force: bool = False) -> Path:
    """The `zagreus dpo` stage; returns the export folder."""
    from tqdm import tqdm

    from zagreus.post.datasets import summarize
    from zagreus.recipe import dump_recipe
    from zagreus.train.optim import build_optimizer, lr_multiplier

    start = open_stage(recipe, "dpo", recipe.run_path() / "sft" / "export", force)
    if start is None:
        return recipe.run_path() / "dpo" / "export"
    sec, out, device, model, tok = start.sec, start.out, start.device, start.model, start.tokenizer
    init_path, examples, stats = start.init_path, start.examples, start.stats
    pairs, tok_stats = tokenize_pairs(examples, tok, sec.template, sec.seq_len)
    if not pairs:
        raise UserError("dpo: no pair has completion tokens within seq_len; raise dpo.seq_len")
    pad = pad_id(tok)
    chunk = recipe.pretrain.loss_chunk
    ref = reference_logprobs(model, pairs, sec.micro_batch, pad, device, chunk)

    per_step = sec.micro_batch * sec.grad_accum
    steps_per_epoch = math.ceil(len(pairs) / per_step)
    total_steps = steps_per_epoch * sec.epochs
    log.info("dpo: %d pairs, %d steps per epoch x %d epochs, beta %g", len(pairs), steps_per_epoch, sec.epochs, sec.beta)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
    (out / "metrics.jsonl").unlink(missing_ok=True)
    metrics = Metrics(out / "metrics.jsonl")
    opt = build_optimizer(model, sec.optimizer)
    schedule = lr_multiplier(sec.schedule, total_steps, sec.optimizer.lr)
    model.train()
    step, last = 0, {}
    t0 = time.time()
    bar = tqdm(total=total_steps, desc="dpo", unit="step", disable=None)
    for epoch in range(sec.epochs):
        order = list(range(len(pairs)))
        random.Random(sec.seed * 1000 + epoch).shuffle(order)
        for s in range(steps_per_epoch):
            idx = order[s * per_step : (s + 1) * per_step]
            lr = sec.optimizer.lr * schedule(step)
            for group in opt.param_groups:
                group["lr"] = lr
            losses, chosen_r, rejected_r = [], [], []
            for m in range(0, len(idx), sec.micro_batch):
                mb = idx[m : m + sec.micro_batch]
                tokens, labels = pair_batch([pairs[i] for i in mb], pad, device)
                with autocast(device):
                    lp = sequence_logprobs(model, tokens, labels, chunk)
                n = len(mb)
                r = ref[mb].to(device=device, dtype=lp.dtype)
                loss, cr, rr = dpo_loss(lp[:n], lp[n:], r[:, 0], r[:, 1], sec.beta)
                # Mean over the step's pairs, however they fall into micro-batches.
                (loss.sum() / len(idx)).backward()
                losses.append(loss.detach())
                chosen_r.append(cr)
                rejected_r.append(rr)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), sec.optimizer.clip)
            if not torch.isfinite(grad_norm):
                raise UserError(f"dpo: non-finite gradient norm at step {step}; lower dpo.optimizer.lr")
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            cr_all, rr_all = torch.cat(chosen_r), torch.cat(rejected_r)
            last = {"loss": float(torch.cat(losses).mean()), "rewards_chosen": float(cr_all.mean()),
                    "rewards_rejected": float(rr_all.mean()), "margins": float((cr_all - rr_all).mean()),
                    "accuracy": float((cr_all > rr_all).float().mean())}
            if step % sec.log_every == 0 or step == total_steps:
                metrics.write({"step": step, "epoch": epoch, "lr": lr, "grad_norm": float(grad_norm), **last,
                               "pairs_per_s": step * per_step / max(time.time() - t0, 1e-9)})
                bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['accuracy']:.2f}")
    bar.close()
    metrics.close()
    model.eval()
    export_dir = export(model, tok, out / "export", sec.template, {"stage": "dpo", "init": str(init_path)})
    summary = {"finished": True, "stage": "dpo", "init": str(init_path), "template": sec.template, "beta": sec.beta,
               "steps": total_steps, "epochs": sec.epochs, "final": last, "data": summarize(stats),
               "tokenized": tok_stats, "export": str(export_dir),
               "reference_logprobs_mean": {"chosen": float(ref[:, 0].mean()), "rejected": float(ref[:, 1].mean())}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    log.info("dpo: done, %d steps, last loss %.4f, accuracy %.2f, export %s", total_steps, last["loss"],
             last["accuracy"], export_dir)
    return export_dir
