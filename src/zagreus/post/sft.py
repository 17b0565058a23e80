"""Supervised fine-tuning: conversations rendered with a chat template, loss on assistant tokens
only (their end-of-turn token included), packed several to a row with document masking or one
to a row with padding, trained for the recipe's epochs with its schedule and AdamW.

Packing: conversations are laid end to end (next-fit, in shuffled order) into rows of at most
seq_len tokens; attention is block-diagonal causal (a boolean [B, 1, T, T] mask) and RoPE
positions restart at 0 for every conversation, so each conversation is computed exactly as if
it were alone (tests/test_post_train.py checks this to 1e-5).

Training runs on the trainer skeleton (zagreus.train.trainer): checkpoints every
sft.checkpoint.every steps under runs/<name>/sft/checkpoints/, exact resume after a kill (the rows
and every epoch's order follow from the seed, so the data position is the step), SIGTERM saves the
step in flight. Output: runs/<name>/sft/export/ (a Hugging Face folder with the chat template,
what `zagreus chat`, `serve`, `eval` and `dpo` read), metrics.jsonl and summary.json (data counts,
steps, final loss). A finished stage is skipped unless forced.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from zagreus.devices import autocast
from zagreus.post.chat import render
from zagreus.post.datasets import ChatExample
from zagreus.post.ranks import Ranks
from zagreus.post.shards import ChatShards, Encoded
from zagreus.rundir import RunDir
from zagreus.post.common import (
    IGNORE, EpochTask, Sequence, open_stage, pad_id, padded_batch, round_up, stand_in, to_sequence, train_stage,
    vocab_parallel_nll,
)
from zagreus.train.losses import chunked_cross_entropy
from zagreus.train.trainer import StepResult

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """A micro-batch: tokens/labels [B, T]; for packed rows also RoPE positions [B, T], the
    block-diagonal causal mask [B, 1, T, T] and doc [B, T] (index of the conversation in its
    row, -1 on padding)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    doc: torch.Tensor | None = None

    @property
    def trained_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def conversation_encoder(tokenizer, template: str, seq_len: int) -> Callable[[ChatExample], Encoded]:
    """One conversation rendered with the template into its (ids, targets), cut to seq_len; none
    when nothing is left to learn (zagreus.post.shards counts those)."""
    def encode(ex: ChatExample) -> Encoded:
        r = render(ex.messages, tokenizer, template, tools=ex.tools)
        seq, cut = to_sequence(r.ids, r.assistant_mask, seq_len)
        return ([] if all(label == IGNORE for label in seq.labels) else [(seq.ids, seq.labels)]), cut
    return encode


def pack(lengths, seq_len: int) -> np.ndarray:
    """Next-fit packing of sequences in the given order into rows of at most seq_len tokens: the
    index where each row starts, then len(lengths). A few bytes per sequence, whatever their number."""
    starts, used, at = [], seq_len + 1, 0
    for begin in range(0, len(lengths), 65536):  # Python ints for one slice at a time
        for n in np.asarray(lengths[begin : begin + 65536]).tolist():
            if used + n > seq_len:
                starts.append(at)
                used = 0
            used += n
            at += 1
    return np.array(starts + [at], dtype=np.int64)


class Rows:
    """Training rows as two arrays: conversation indices laid end to end, and where each row starts."""

    def __init__(self, members: np.ndarray, starts: np.ndarray):
        self.members, self.starts = members, starts

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, r: int) -> list[int]:
        return self.members[self.starts[r] : self.starts[r + 1]].tolist()

    def __iter__(self):
        return (self[r] for r in range(len(self)))


def packed_batch(rows: list[list[Sequence]], pad: int, device: torch.device, multiple: int = 1) -> Batch:
    """Rows of several conversations each, with document masking and per-conversation positions
    (T a multiple of `multiple`)."""
    T = round_up(max(sum(len(s) for s in row) for row in rows), multiple)
    B = len(rows)
    tokens = torch.full((B, T), pad, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    doc = torch.full((B, T), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for d, s in enumerate(row):
            n = len(s)
            tokens[b, at : at + n] = torch.tensor(s.ids)
            labels[b, at : at + n] = torch.tensor(s.labels)
            positions[b, at : at + n] = torch.arange(n)
            doc[b, at : at + n] = d
            at += n
        positions[b, at:] = torch.arange(T - at)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    # Padding shares doc -1, so its rows still attend to something (no NaN) and no one sees it.
    mask = (doc[:, :, None] == doc[:, None, :]) & causal
    return Batch(tokens.to(device), labels.to(device), positions.to(device), mask[:, None].to(device), doc.to(device))


def make_batch(rows: list[list[Sequence]], pad: int, device: torch.device, packing: bool, multiple: int = 1) -> Batch:
    if packing:
        return packed_batch(rows, pad, device, multiple)
    tokens, labels = padded_batch([row[0] for row in rows], pad, device, multiple)
    return Batch(tokens, labels)


def token_losses(model, batch: Batch, chunk_tokens: int = 4096, reduction: str = "none",
                 vocab_parallel: bool = False) -> torch.Tensor:
    """Cross-entropy of every target ([B, T], 0 where ignored), or its sum. vocab_parallel: the
    model is tensor-parallel and its logits sharded on the vocabulary (call inside loss_parallel)."""
    if vocab_parallel:
        return vocab_parallel_nll(model(batch.tokens, positions=batch.positions, mask=batch.mask), batch.labels, reduction)
    hidden = model(batch.tokens, positions=batch.positions, mask=batch.mask, return_hidden=True)
    return chunked_cross_entropy(hidden, model.lm_head.weight, batch.labels, chunk_tokens, ignore_index=IGNORE,
                                 reduction=reduction)


def build_rows(lengths, seq_len: int, packing: bool, seed: int) -> Rows:
    """Rows of conversation indices, in an order shuffled from the seed: one each, or packed next-fit."""
    lengths = np.asarray(lengths)
    order = np.random.default_rng(seed).permutation(len(lengths))
    if not packing:
        return Rows(order, np.arange(len(lengths) + 1))
    return Rows(order, pack(lengths[order], seq_len))


class SFTTask(EpochTask):
    """One SFT step: micro-batches of rows; the loss is the mean over the step's trained tokens, over all ranks."""

    unit = "tokens"

    def __init__(self, model, shards: ChatShards, rows: Rows, sec, pad: int, ranks: Ranks, chunk: int):
        super().__init__("sft", rows, "rows", model, sec, pad, ranks, chunk)
        self.shards = shards

    def row(self, r: int) -> list[Sequence]:
        return [Sequence(*self.shards.item(i)[0]) for i in self.items[r]]

    def step(self, step: int) -> StepResult:
        epoch, chunks, _ = self.micro_batches(step)
        micro = [make_batch([self.row(r) for r in chunk] if chunk else [[stand_in(self.pad)]], self.pad, self.device,
                            self.sec.packing, self.ranks.tp) for chunk in chunks]
        counts = self.ranks.all_sum(torch.tensor([sum(b.trained_tokens for b in micro),
                                                  sum(b.tokens.numel() for b in micro)], dtype=torch.float64))
        n_trained = int(counts[0])
        total = torch.zeros((), dtype=torch.float64)
        with self.ranks.loss_context():
            for b in micro:
                with autocast(self.device):
                    loss_sum = token_losses(self.model, b, self.chunk, reduction="sum", vocab_parallel=self.ranks.tp > 1)
                # Mean over the step's trained tokens, however they fall into micro-batches and ranks
                # (data parallelism averages gradients over the ranks, hence x dp).
                (loss_sum * self.ranks.dp / n_trained).backward()
                total += loss_sum.detach().double().cpu()
        total = self.ranks.all_sum(total)
        return StepResult(total / n_trained, int(counts[1]), {"epoch": epoch, "trained_tokens": n_trained})


def run_sft(recipe, force: bool = False) -> Path | None:
    """The `zagreus sft` stage; returns the export folder, or None when SIGTERM stopped it (resume by rerunning)."""
    start = open_stage(recipe, "sft", recipe.run_path(), force,
                       lambda tok, sec: conversation_encoder(tok, sec.template, sec.seq_len))
    if start is None:
        return RunDir(recipe.run_path()).stage("sft").export
    sec, tok, shards = start.sec, start.tokenizer, start.shards
    rows = build_rows(shards.lengths[:, 0], sec.seq_len, sec.packing, sec.seed)
    task = SFTTask(start.model, shards, rows, sec, pad_id(tok), start.ranks, recipe.pretrain.loss_chunk)
    log.info("sft: %d conversations in %d rows (%s), %d steps per epoch x %d epochs", len(shards), len(rows),
             "packed" if sec.packing else "padded", task.steps_per_epoch, sec.epochs)
    export_dir = train_stage(recipe, start, task, lambda last: {"rows": len(rows), "final_loss": last["loss"]})
    if export_dir is not None:
        log.info("sft: done, %d steps, export %s", task.total_steps, export_dir)
    return export_dir
