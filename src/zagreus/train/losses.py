"""Cross-entropy over large vocabularies without ever holding [tokens x vocab] fp32 logits.

The output projection and the loss are fused and run over chunks of tokens (loss = -log of the
softmax at the target, exact log-sum-exp where that underflows). With a scalar
reduction ("mean" or "sum") the gradients of the hidden states and of the output matrix are
computed chunk by chunk during the forward pass (the softmax is at hand there), so training
costs three vocabulary-sized matmuls, like the plain loss, while peak memory holds one chunk
of logits. With reduction="none" (per-token log-probabilities for SFT/DPO) every chunk is
recomputed in backward by activation checkpointing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax and loss run in fp32 at least (fp64 inputs stay fp64)."""
    return torch.promote_types(dtype, torch.float32)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Matmul dtype: the autocast dtype when autocast is on for this device, else the input's."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens: int, ignore_index: int, reduction: str):
        dtype = _compute_dtype(hidden)
        acc = _loss_dtype(dtype)
        w = weight.to(dtype)
        n = hidden.shape[0]
        valid = targets != ignore_index
        count = valid.sum()
        # The per-token gradient scale of the reduction; "mean" divides by valid tokens as F.cross_entropy does.
        scale = (1.0 / count.to(acc)) if reduction == "mean" else torch.ones((), dtype=acc, device=hidden.device)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        # On CPU one logits buffer serves every chunk and the softmax runs in place: fresh 100 MB
        # buffers per chunk cost more in page faults than the arithmetic (and logsumexp is ~40x
        # slower than the fused softmax kernel there).
        in_place = hidden.device.type == "cpu" and dtype == acc
        buffer = torch.empty(min(chunk_tokens, n), weight.shape[0], dtype=acc, device=hidden.device) if in_place else None
        for start in range(0, n, chunk_tokens):
            h = hidden[start : start + chunk_tokens].to(dtype)
            t = targets[start : start + chunk_tokens]
            v = valid[start : start + chunk_tokens]
            rows = torch.arange(len(t), device=t.device)
            safe_t = torch.where(v, t, 0)
            if in_place:
                probs = torch.mm(h, w.T, out=buffer[: len(t)])
                torch.ops.aten._softmax.out(probs, -1, False, out=probs)
            else:
                probs = torch.softmax((h @ w.T).to(acc), dim=-1)
            p_target = probs[rows, safe_t]
            token_loss = -torch.log(p_target)
            underflow = (p_target == 0) & v
            if underflow.any():  # p < 1e-38 (a loss above 87 nats): recompute those rows exactly
                bad = underflow.nonzero().squeeze(1)
                logits = (h[bad] @ w.T).to(acc)
                token_loss[bad] = torch.logsumexp(logits, -1) - logits.gather(1, safe_t[bad, None]).squeeze(1)
            total += torch.where(v, token_loss, 0.0).sum()
            if needs_grad:
                # d loss / d logits = (softmax - onehot) x the row's scale (0 for ignored rows); the scale
                # is applied to the small [chunk, D] operands instead of the [chunk, V] matrix.
                probs[rows, safe_t] -= 1.0
                row_scale = (v.to(acc) * scale)[:, None]
                g = probs.to(dtype)
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk_tokens] = ((g @ w).to(acc) * row_scale).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight.addmm_(g.T.to(acc), h.to(acc) * row_scale)  # fp32 accumulation across chunks
        loss = total * scale
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_out.device.type == "cpu" and grad_out.item() == 1.0:
            # The usual case (loss.backward()): skip a pass over the [V, D] gradient and its copy.
            return grad_hidden, None if grad_weight is None else grad_weight.to(ctx.weight_dtype), None, None, None, None
        gh = grad_hidden * grad_out.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * grad_out).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None, None


def _chunk_token_losses(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, ignore_index: int) -> torch.Tensor:
    dtype = _compute_dtype(h)
    logits = (h @ weight.to(dtype).T).to(_loss_dtype(dtype))
    return F.cross_entropy(logits, t, ignore_index=ignore_index, reduction="none")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int = 1024,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """F.cross_entropy(hidden @ weight.T, targets) computed `chunk_tokens` rows at a time.

    hidden: [..., D] final hidden states; weight: [V, D] output matrix; targets: [...] ids,
    `ignore_index` where no loss is wanted. reduction "mean" (over non-ignored tokens), "sum",
    or "none" (per-token losses, 0 at ignored positions, shaped like targets).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if reduction != "none":
        return _FusedLinearCrossEntropy.apply(h, weight, t, chunk_tokens, ignore_index, reduction)
    pieces = []
    for start in range(0, h.shape[0], chunk_tokens):
        hc, tc = h[start : start + chunk_tokens], t[start : start + chunk_tokens]
        if torch.is_grad_enabled() and (hc.requires_grad or weight.requires_grad):
            pieces.append(checkpoint(_chunk_token_losses, hc, weight, tc, ignore_index, use_reentrant=False))
        else:
            pieces.append(_chunk_token_losses(hc, weight, tc, ignore_index))
    return torch.cat(pieces).reshape(shape)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 1024,
                   ignore_index: int = -100) -> torch.Tensor:
    """log p(target) per position ([..] like targets, 0 where ignored), differentiable, chunked."""
    return -chunked_cross_entropy(hidden, weight, targets, chunk_tokens, ignore_index, reduction="none")
