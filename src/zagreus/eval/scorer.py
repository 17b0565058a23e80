"""Fast log-likelihood scoring of (context, continuation) token pairs with our Transformer.

This is what makes our evaluator faster than lm-eval's `hf` model, with the same numbers:

* Only the positions that predict a continuation token go through the output matrix; the
  rest of the sequence stops at the final hidden state (`return_hidden=True`). With a
  128k vocabulary the output projection and its log-softmax are nearly all the work.
* Choices sharing a context (every multiple-choice item) are packed into one row as a tree:
  the context once, then each choice's tokens with RoPE positions restarting after the
  context and a mask letting each choice see the context and itself only. The position
  predicting a choice's first token is the context's last one, computed once for all choices.
* Rows are sorted by length and batched under a token budget, so padding stays small.

Truncation follows lm-eval's HFLM: when context + continuation exceed the model's context,
the context is cut from the left so that the model sees the last `max_seq_len` tokens.

The sums differ from HFLM's in the last bits (other shapes, other summation order), so each
request also carries its greedy margin, from which `zagreus.eval.tiebreak` finds the close
calls to decide again in HFLM's own layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

from zagreus.model.llama import Transformer

log = logging.getLogger(__name__)


@dataclass
class _Tree:
    """One context and the continuations scored after it, packed into a single row."""

    context: tuple[int, ...]
    requests: list[int] = field(default_factory=list)  # indices into the caller's list
    continuations: list[Sequence[int]] = field(default_factory=list)

    @property
    def length(self) -> int:
        # A continuation's last token is only ever predicted, never fed in.
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)


def _build_trees(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_len: int) -> list[_Tree]:
    trees: dict[tuple[int, ...], _Tree] = {}
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise ValueError(f"request {i}: empty continuation")
        if len(cont) > max_len:
            raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds the context of {max_len}")
        keep = max_len + 1 - len(cont)
        ctx = tuple(ctx[-keep:]) if len(ctx) > keep else tuple(ctx)
        if not ctx:
            raise ValueError(f"request {i}: empty context (pass at least a BOS token)")
        tree = trees.setdefault(ctx, _Tree(ctx))
        tree.requests.append(i)
        tree.continuations.append(cont)
    return list(trees.values())


def _pack(trees: list[_Tree], device: torch.device):
    """Tokens, positions and tree masks [B, 1, T, T] for a batch, plus the predicting positions."""
    T = max(t.length for t in trees)
    B = len(trees)
    tokens = torch.zeros(B, T, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    # Padding rows attend to themselves only, so no row of the mask is all False.
    mask = torch.eye(T, dtype=torch.bool).repeat(B, 1, 1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    rows, cols, targets, owners = [], [], [], []
    for b, tree in enumerate(trees):
        c = len(tree.context)
        tokens[b, :c] = torch.tensor(tree.context)
        positions[b, :c] = torch.arange(c)
        mask[b, :c, :c] = causal[:c, :c]
        start = c
        for req, cont in zip(tree.requests, tree.continuations):
            n = len(cont) - 1
            if n:
                tokens[b, start:start + n] = torch.tensor(cont[:-1])
                positions[b, start:start + n] = torch.arange(c, c + n)
                mask[b, start:start + n, :c] = True
                mask[b, start:start + n, start:start + n] = causal[:n, :n]
            predicting = [c - 1] + list(range(start, start + n))
            rows += [b] * len(predicting)
            cols += predicting
            targets += list(cont)
            owners += [req] * len(cont)
            start += n
    return (tokens.to(device), positions.to(device), mask[:, None].to(device),
            torch.tensor(rows), torch.tensor(cols), torch.tensor(targets), torch.tensor(owners))


@dataclass
class PairScores:
    """Per request: sum of log p(continuation | context), whether every token is the argmax,
    and the greedy margin: the smallest gap, over its tokens, between the top logit and the
    runner-up (target top) or the target (target not top); 0 on an exact tie, which counts as
    not greedy and so as a close call for the tiebreak."""

    logprob: list[float]
    greedy: list[bool]
    greedy_margin: list[float]

    def results(self) -> list[tuple[float, bool]]:
        """lm-eval's (log-likelihood, is_greedy) pairs."""
        return list(zip(self.logprob, self.greedy))


@torch.inference_mode()
def token_logprobs(model: Transformer, hidden: torch.Tensor, targets: torch.Tensor,
                   rows: int | None = None, block: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p(target), whether target is the argmax, and the greedy gap (see PairScores), for
    hidden states [N, D] and targets [N]; fp32 like HFLM's log_softmax.

    On CPU the output projection is tiled, `rows` positions by `block` vocabulary entries,
    with an online log-sum-exp and a running max of the non-target logits, so each [rows, block]
    tile stays in cache: 64 x 16384 measured 1.3-1.4x faster than whole-vocabulary rows at d=64 and a
    128k vocabulary (docs/benchmarks.md). On GPU one block spans the vocabulary and rows are
    many, so kernels stay large.
    """
    weight = model.lm_head.weight
    vocab = weight.shape[0]
    on_cpu = hidden.device.type == "cpu"
    rows = rows or (64 if on_cpu else 1024)
    block = min(block or (16384 if on_cpu else vocab), vocab)
    targets = targets.to(hidden.device)
    logps, greedy, gaps = [], [], []
    for s in range(0, hidden.shape[0], rows):
        h, tgt = hidden[s:s + rows], targets[s:s + rows]
        n = h.shape[0]
        run_max = torch.full((n,), -float("inf"), device=h.device)
        run_sum = torch.zeros(n, device=h.device)
        picked = torch.zeros(n, device=h.device)
        # The largest logit of any token but the target: with the target's own, it gives both
        # greedy (target above all others) and the gap, at the cost of a max (a top-2 costs more).
        other = torch.full((n,), -float("inf"), device=h.device)
        for v0 in range(0, vocab, block):
            logits = (h @ weight[v0:v0 + block].T).float()
            width = logits.shape[1]
            new_max = torch.maximum(run_max, logits.amax(dim=-1))
            run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(logits - new_max[:, None]).sum(dim=-1)
            run_max = new_max
            here = (tgt >= v0) & (tgt < v0 + width)
            local = (tgt - v0).clamp(0, width - 1)[:, None]
            value = logits.gather(1, local)[:, 0]
            picked = torch.where(here, value, picked)
            # The tile is spent: hide the target (rows whose target lies elsewhere keep their value).
            logits.scatter_(1, local, torch.where(here, -float("inf"), value)[:, None])
            other = torch.maximum(other, logits.amax(dim=-1))
        logps.append(picked - (run_max + run_sum.log()))
        # An exact tie leaves a gap of 0 (not greedy): a close call that the tiebreak decides again.
        greedy.append(picked > other)
        gaps.append((picked - other).abs())
    return torch.cat(logps).cpu(), torch.cat(greedy).cpu(), torch.cat(gaps).cpu()


@torch.inference_mode()
def score_pairs(model: Transformer, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                batch_tokens: int = 4096, progress: bool = False) -> PairScores:
    """Scores of each (context, continuation) pair; see PairScores."""
    from tqdm import tqdm

    if not pairs:
        return PairScores([], [], [])
    device = next(model.parameters()).device
    trees = sorted(_build_trees(pairs, model.cfg.max_seq_len), key=lambda t: t.length, reverse=True)
    total = torch.zeros(len(pairs), dtype=torch.float64)
    all_greedy = torch.ones(len(pairs), dtype=torch.bool)
    margin = torch.full((len(pairs),), float("inf"))
    bar = tqdm(total=len(pairs), desc="loglikelihood", disable=not progress, unit="req")
    i = 0
    while i < len(trees):
        # Longest first: the first row sets the padded width of the batch.
        width = trees[i].length
        n = max(1, batch_tokens // width)
        batch = trees[i:i + n]
        i += len(batch)
        tokens, positions, mask, rows, cols, targets, owners = _pack(batch, device)
        hidden = model(tokens, positions=positions, mask=mask, return_hidden=True)
        logp, greedy, gap = token_logprobs(model, hidden[rows.to(device), cols.to(device)], targets)
        total.index_add_(0, owners, logp.double())
        # A request is greedy only if every one of its tokens is the argmax.
        all_greedy[owners[~greedy]] = False
        margin.scatter_reduce_(0, owners, gap, reduce="amin")
        bar.update(sum(len(t.requests) for t in batch))
    bar.close()
    return PairScores(total.tolist(), all_greedy.tolist(), margin.tolist())
