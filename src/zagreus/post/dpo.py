"""Preference optimization on pairs: DPO's sigmoid loss (Rafailov et al. 2023) or IPO (Azar et al. 2023).

With h = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)), `dpo.loss` picks

    sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps = dpo.label_smoothing, cDPO)
    ipo:     (h - 1 / (2 beta))^2, each log-probability averaged over the completion's tokens

where log pi(y) is the summed log-probability of the completion's assistant tokens (end-of-turn
included) given the prompt, and IPO divides each side's log-ratio by its token count, as TRL's
DPOTrainer does (its "sigmoid" loss and label smoothing as before its DPO refactor of v0.29, its
"ipo" loss as today). The reference model is the starting model itself: its summed sequence
log-probabilities are computed once, before the first update, and kept as two floats per pair
(the token counts follow from the pairs), so no frozen copy of the model lives in memory.

Logged per step: loss, rewards (chosen, rejected: beta x summed log-ratio, as TRL logs them),
margins and accuracy (share of pairs whose chosen reward beats the rejected one). Training runs on
the trainer skeleton like SFT (checkpoints, exact resume, SIGTERM); the reference log-probabilities
are saved once in runs/<name>/dpo/reference_logprobs.pt, so a resumed run uses the starting
model's, not the half-trained one's. Output: runs/<name>/dpo/export/, metrics.jsonl, summary.json.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from zagreus.devices import autocast
from zagreus.errors import UserError
from zagreus.post.chat import render
from zagreus.post.common import (
    IGNORE, EpochTask, Sequence, StageStart, open_stage, pad_id, padded_batch, stand_in, to_sequence, train_stage,
    vocab_parallel_nll,
)
from zagreus.post.datasets import PreferenceExample
from zagreus.post.ranks import Ranks, reshard
from zagreus.post.shards import ChatShards, Encoded
from zagreus.rundir import RunDir
from zagreus.train.losses import token_logprobs
from zagreus.train.trainer import StepResult

log = logging.getLogger(__name__)


@dataclass
class Pair:
    chosen: Sequence
    rejected: Sequence


def pair_encoder(tokenizer, template: str, seq_len: int) -> Callable[[PreferenceExample], Encoded]:
    """prompt+chosen and prompt+rejected rendered with the template, only the completion's assistant
    tokens trained, each cut to seq_len; none when either side has nothing left to learn."""
    def encode(ex: PreferenceExample) -> Encoded:
        prompt_len = len(render(ex.prompt, tokenizer, template, tools=ex.tools).ids)
        seqs, cut = [], False
        for completion in (ex.chosen, ex.rejected):
            full = render(ex.prompt + completion, tokenizer, template, tools=ex.tools)
            # Every turn ends in a special token, so the prompt's ids are a prefix of the full ones.
            trained = [m and i >= prompt_len for i, m in enumerate(full.assistant_mask)]
            seq, truncated = to_sequence(full.ids, trained, seq_len)
            seqs.append((seq.ids, seq.labels))
            cut |= truncated
        empty = any(all(x == IGNORE for x in labels) for _, labels in seqs)
        return ([] if empty else seqs), cut
    return encode


def pair_of(shards: ChatShards, i: int) -> Pair:
    return Pair(*(Sequence(ids, labels) for ids, labels in shards.item(i)))


def sequence_logprobs(model, tokens: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 4096,
                      vocab_parallel: bool = False) -> torch.Tensor:
    """Summed log-probability of the labelled targets of each row ([B]); padding is on the right.
    vocab_parallel: a tensor-parallel model's vocabulary-sharded logits (call inside loss_parallel)."""
    if vocab_parallel:
        return -vocab_parallel_nll(model(tokens), labels, "none").float().sum(-1)
    hidden = model(tokens, return_hidden=True)
    lp = token_logprobs(hidden, model.lm_head.weight, labels, chunk_tokens, ignore_index=IGNORE)
    return lp.float().sum(-1)


def completion_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Trained targets of each row ([B]): the token counts IPO averages the log-probabilities over."""
    return (labels != IGNORE).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss (`loss`: sigmoid or ipo, see the module docstring) from summed log-probabilities,
    and the implicit rewards of chosen and rejected. IPO needs each completion's token count."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss == "sigmoid":
        h = beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    elif loss == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs the completions' token counts")
        h = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss!r}; choose sigmoid or ipo")
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def pair_batch(pairs: list[Pair], pad: int, device: torch.device, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen sequences first, then rejected, in one padded batch (one forward pass for both)."""
    return padded_batch([p.chosen for p in pairs] + [p.rejected for p in pairs], pad, device, multiple)


@torch.no_grad()
def reference_logprobs(model, pairs: ChatShards, micro_batch: int, pad: int, ranks: Ranks,
                       chunk_tokens: int = 4096) -> torch.Tensor:
    """[N, 2] (chosen, rejected) log-probabilities of every pair under the model as it is now.

    Under torchrun each rank scores a contiguous block of whole micro-batches (the same batches
    one process forms) and the blocks are gathered, so every rank returns all N rows."""
    was_training = model.training
    model.eval()
    n = len(pairs)
    block = math.ceil(math.ceil(n / ranks.dp) / micro_batch) * micro_batch
    mine = ranks.block(range(n), block)  # a range: no list of every pair
    out = torch.zeros(block, 2, dtype=torch.float64)
    for start in tqdm(range(0, block, micro_batch), desc="dpo reference", unit="batch", disable=None):
        idx = mine[start : start + micro_batch]
        if not idx and ranks.dp == 1:
            break
        chunk = [pair_of(pairs, i) for i in idx] or [Pair(stand_in(pad), stand_in(pad))]
        tokens, labels = pair_batch(chunk, pad, ranks.device, ranks.tp)
        with autocast(ranks.device), ranks.loss_context():
            lp = sequence_logprobs(model, tokens, labels, chunk_tokens, ranks.tp > 1).double().cpu()
        k = len(idx)
        out[start : start + k, 0] = lp[:k]
        out[start : start + k, 1] = lp[len(chunk):len(chunk) + k]
    model.train(was_training)
    if ranks.dp > 1:
        reshard(model)
    return ranks.all_gather(out)[:n]


def stored_reference(start: StageStart, pad: int, chunk: int) -> torch.Tensor:
    """The reference log-probabilities: computed once from the starting model and kept in the stage folder.

    A resumed run must use the starting model's values, and the model in memory is then already
    restored from a checkpoint, so the file is written before the first update and read after.
    """
    path = start.stage.reference
    pairs = start.shards
    key = {"init": str(start.init_path), "pairs": len(pairs)}
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved.get("key") == key:
            return saved["logprobs"]
        log.info("dpo: %s was computed for other data or another starting model; computing again", path)
    if start.stage.latest_checkpoint() is not None:
        raise UserError(f"dpo: {path} is missing or stale but {start.stage.checkpoints} holds a half-trained model; "
                        f"pass --force to start over")
    ref = reference_logprobs(start.model, pairs, start.sec.micro_batch, pad, start.ranks, chunk)
    if start.ranks.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"key": key, "logprobs": ref}, tmp)
        os.replace(tmp, path)
    return ref


class DPOTask(EpochTask):
    """One DPO step: micro-batches of pairs (chosen and rejected in one forward); the mean loss over
    the step's pairs, over all ranks."""

    unit = "pairs"

    def __init__(self, model, pairs: ChatShards, ref: torch.Tensor, sec, pad: int, ranks: Ranks, chunk: int):
        super().__init__("dpo", pairs, "pairs", model, sec, pad, ranks, chunk)
        self.ref = ref  # [pairs, 2] reference log-probabilities of (chosen, rejected)

    def step(self, step: int) -> StepResult:
        epoch, chunks, n_pairs = self.micro_batches(step)
        sums = torch.zeros(5, dtype=torch.float64)  # loss, chosen and rejected rewards, margins, correct
        with self.ranks.loss_context():
            for mb in chunks:
                pairs = [pair_of(self.items, i) for i in mb] or [Pair(stand_in(self.pad), stand_in(self.pad))]
                tokens, labels = pair_batch(pairs, self.pad, self.device, self.ranks.tp)
                with autocast(self.device):
                    lp = sequence_logprobs(self.model, tokens, labels, self.chunk, self.ranks.tp > 1)
                if not mb:  # a stand-in: joins the collectives, adds nothing
                    (lp.sum() * 0).backward()
                    continue
                n, counts = len(mb), completion_tokens(labels).to(lp.dtype)
                r = self.ref[mb].to(device=self.device, dtype=lp.dtype)
                loss, cr, rr = dpo_loss(lp[:n], lp[n:], r[:, 0], r[:, 1], self.sec.beta, self.sec.loss,
                                        self.sec.label_smoothing, counts[:n], counts[n:])
                # Mean over the step's pairs, however they fall into micro-batches and ranks
                # (data parallelism averages gradients over the ranks, hence x dp).
                (loss.sum() * self.ranks.dp / n_pairs).backward()
                sums += torch.stack([loss.detach().sum(), cr.sum(), rr.sum(), (cr - rr).sum(),
                                     (cr > rr).sum()]).double().cpu()
        loss, chosen, rejected, margins, correct = (self.ranks.all_sum(sums) / n_pairs).tolist()
        return StepResult(torch.tensor(loss), n_pairs, {
            "epoch": epoch, "rewards_chosen": chosen, "rewards_rejected": rejected, "margins": margins,
            "accuracy": correct})


FINAL_KEYS = ("loss", "rewards_chosen", "rewards_rejected", "margins", "accuracy")


def run_dpo(recipe, force: bool = False) -> Path | None:
    """The `zagreus dpo` stage; returns the export folder, or None when SIGTERM stopped it (resume by rerunning)."""
    run = RunDir(recipe.run_path())
    start = open_stage(recipe, "dpo", run.stage("sft").export, force,
                       lambda tok, sec: pair_encoder(tok, sec.template, sec.seq_len))
    if start is None:
        return run.stage("dpo").export
    sec, tok, pairs = start.sec, start.tokenizer, start.shards
    pad, chunk = pad_id(tok), recipe.pretrain.loss_chunk
    ref = stored_reference(start, pad, chunk)
    task = DPOTask(start.model, pairs, ref, sec, pad, start.ranks, chunk)
    log.info("dpo: %d pairs, %d steps per epoch x %d epochs, %s loss, beta %g%s", len(pairs), task.steps_per_epoch,
             sec.epochs, sec.loss, sec.beta, f", label smoothing {sec.label_smoothing:g}" if sec.label_smoothing else "")
    export_dir = train_stage(recipe, start, task, lambda last: {
        "loss_type": sec.loss, "beta": sec.beta, "label_smoothing": sec.label_smoothing,
        "final": {k: last[k] for k in FINAL_KEYS},
        "reference_logprobs_mean": {"chosen": float(ref[:, 0].mean()), "rejected": float(ref[:, 1].mean())}})
    if export_dir is not None:
        log.info("dpo: done, %d steps, export %s", task.total_steps, export_dir)
    return export_dir
