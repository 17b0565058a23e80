"""Supervised fine-tuning: conversations rendered with a chat template, loss on assistant tokens
only (their end-of-turn token included), packed several to a row with document masking or one
to a row with padding, trained for the recipe's epochs with its schedule and AdamW.

Packing: conversations are laid end to end (next-fit, in shuffled order) into rows of at most
seq_len tokens; attention is block-diagonal causal (a boolean [B, 1, T, T] mask) and RoPE
positions restart at 0 for every conversation, so each conversation is computed exactly as if
it were alone (tests/test_post_train.py checks this to 1e-5).

Output: runs/<name>/sft/export/ (a Hugging Face folder with the chat template, what `zagreus
chat`, `serve`, `eval` and `dpo` read), metrics.jsonl and summary.json (data counts, steps,
final loss). There are no mid-run checkpoints: an SFT run is short; a rerun starts over, and a
finished one is skipped unless forced.
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

from zagreus.errors import UserError
from zagreus.post.common import (
    IGNORE, Metrics, Sequence, autocast, export, open_stage, tokenization_report, pad_id, padded_batch, to_sequence,
)

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


def tokenize_examples(examples, tokenizer, template: str, seq_len: int) -> tuple[list[Sequence], dict]:
    """Render every conversation; counts truncated ones and drops those left with nothing to learn."""
    from zagreus.post.chat import render

    seqs, truncated, empty = [], 0, 0
    for ex in examples:
        r = render(ex.messages, tokenizer, template, tools=ex.tools)
        seq, cut = to_sequence(r.ids, r.assistant_mask, seq_len)
        truncated += cut
        if all(label == IGNORE for label in seq.labels):
            empty += 1
            continue
        seqs.append(seq)
    return seqs, tokenization_report("conversation", len(seqs), truncated, empty, seq_len)


def pack(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Next-fit packing: indices of the sequences laid into each row, in the given order."""
    rows: list[list[int]] = []
    used = seq_len + 1
    for i, n in enumerate(lengths):
        if used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def packed_batch(rows: list[list[Sequence]], pad: int, device: torch.device) -> Batch:
    """Rows of several conversations each, with document masking and per-conversation positions."""
    T = max(sum(len(s) for s in row) for row in rows)
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


def make_batch(rows: list[list[Sequence]], pad: int, device: torch.device, packing: bool) -> Batch:
    if packing:
        return packed_batch(rows, pad, device)
    tokens, labels = padded_batch([row[0] for row in rows], pad, device)
    return Batch(tokens, labels)


def token_losses(model, batch: Batch, chunk_tokens: int = 4096, reduction: str = "none") -> torch.Tensor:
    """Cross-entropy of every target ([B, T], 0 where ignored), or its sum."""
    from zagreus.train.losses import chunked_cross_entropy

    hidden = model(batch.tokens, positions=batch.positions, mask=batch.mask, return_hidden=True)
    return chunked_cross_entropy(hidden, model.lm_head.weight, batch.labels, chunk_tokens, ignore_index=IGNORE,
                                 reduction=reduction)


def build_rows(seqs: list[Sequence], seq_len: int, packing: bool, seed: int) -> list[list[Sequence]]:
    order = list(range(len(seqs)))
    random.Random(seed).shuffle(order)
    if not packing:
        return [[seqs[i]] for i in order]
    rows = pack([len(seqs[i]) for i in order], seq_len)
    return [[seqs[order[j]] for j in row] for row in rows]


def run_sft(recipe, force: bool = False) -> Path:
    """The `zagreus sft` stage; returns the export folder."""
    from tqdm import tqdm

    from zagreus.post.datasets import summarize
    from zagreus.recipe import dump_recipe
    from zagreus.train.optim import build_optimizer, lr_multiplier

    start = open_stage(recipe, "sft", recipe.run_path(), force)
    if start is None:
        return recipe.run_path() / "sft" / "export"
    sec, out, device, model, tok = start.sec, start.out, start.device, start.model, start.tokenizer
    init_path, examples, stats = start.init_path, start.examples, start.stats
    seqs, tok_stats = tokenize_examples(examples, tok, sec.template, sec.seq_len)
    if not seqs:
        raise UserError("sft: no conversation has an assistant token within seq_len; raise sft.seq_len")
    rows = build_rows(seqs, sec.seq_len, sec.packing, sec.seed)
    per_step = sec.micro_batch * sec.grad_accum
    steps_per_epoch = math.ceil(len(rows) / per_step)
    total_steps = steps_per_epoch * sec.epochs
    log.info("sft: %d conversations in %d rows (%s), %d steps per epoch x %d epochs", len(seqs), len(rows),
             "packed" if sec.packing else "padded", steps_per_epoch, sec.epochs)

    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
    (out / "metrics.jsonl").unlink(missing_ok=True)
    metrics = Metrics(out / "metrics.jsonl")
    opt = build_optimizer(model, sec.optimizer)
    schedule = lr_multiplier(sec.schedule, total_steps, sec.optimizer.lr)
    pad = pad_id(tok)
    chunk = recipe.pretrain.loss_chunk
    model.train()
    step, last_loss, t0 = 0, float("nan"), time.time()
    seen_tokens = 0
    bar = tqdm(total=total_steps, desc="sft", unit="step", disable=None)
    for epoch in range(sec.epochs):
        order = list(range(len(rows)))
        random.Random(sec.seed * 1000 + epoch).shuffle(order)
        for s in range(steps_per_epoch):
            picked = [rows[i] for i in order[s * per_step : (s + 1) * per_step]]
            micro = [make_batch(picked[i : i + sec.micro_batch], pad, device, sec.packing)
                     for i in range(0, len(picked), sec.micro_batch)]
            n_trained = sum(b.trained_tokens for b in micro)
            lr = sec.optimizer.lr * schedule(step)
            for group in opt.param_groups:
                group["lr"] = lr
            total = 0.0
            for b in micro:
                with autocast(device):
                    loss_sum = token_losses(model, b, chunk, reduction="sum")
                # Mean over the step's trained tokens, however they fall into micro-batches.
                (loss_sum / n_trained).backward()
                total += float(loss_sum.detach())
                seen_tokens += b.tokens.numel()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), sec.optimizer.clip)
            if not torch.isfinite(grad_norm):
                raise UserError(f"sft: non-finite gradient norm at step {step}; lower sft.optimizer.lr")
            opt.step()
            opt.zero_grad(set_to_none=True)
            last_loss = total / n_trained
            step += 1
            bar.update(1)
            if step % sec.log_every == 0 or step == total_steps:
                rec = {"step": step, "epoch": epoch, "loss": last_loss, "lr": lr, "grad_norm": float(grad_norm),
                       "trained_tokens": n_trained, "tokens_per_s": seen_tokens / max(time.time() - t0, 1e-9)}
                metrics.write(rec)
                bar.set_postfix(loss=f"{last_loss:.4f}")
    bar.close()
    metrics.close()
    model.eval()
    export_dir = export(model, tok, out / "export", sec.template, {"stage": "sft", "init": str(init_path)})
    summary = {"finished": True, "stage": "sft", "init": str(init_path), "template": sec.template, "steps": total_steps,
               "epochs": sec.epochs, "rows": len(rows), "final_loss": last_loss, "data": summarize(stats),
               "tokenized": tok_stats, "export": str(export_dir)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    log.info("sft: done, %d steps, final loss %.4f, export %s", total_steps, last_loss, export_dir)
    return export_dir
