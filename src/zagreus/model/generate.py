"""Token generation with the KV cache: greedy or sampled (temperature, top-k, top-p,
repetition penalty), streamed one token at a time, stopping on end-of-turn ids."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from zagreus.model.llama import KVCache, Transformer


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    stop_ids: Sequence[int] = field(default_factory=tuple)
    seed: int | None = None


def _adjust_logits(logits: torch.Tensor, seen: list[int], p: SamplingParams) -> torch.Tensor:
    if p.repetition_penalty != 1.0 and seen:
        # CTRL-style penalty, as in transformers: shrink positive logits, push negative ones down.
        idx = torch.tensor(sorted(set(seen)), device=logits.device)
        vals = logits[idx]
        logits[idx] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    return logits


def pick_token(logits: torch.Tensor, seen: list[int], p: SamplingParams, gen: torch.Generator | None) -> int:
    """Next token from the logits [vocab] of the last position."""
    logits = _adjust_logits(logits.float().clone(), seen, p)
    if p.temperature <= 0:
        return int(logits.argmax())
    logits = logits / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits[logits < kth] = float("-inf")
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop tokens once the mass before them already reaches top_p (the first one always stays).
        drop = probs.cumsum(-1) - probs >= p.top_p
        drop[0] = False  # top_p 0 is the greedy limit, not an empty set
        logits[order[drop]] = float("-inf")
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.inference_mode()
def generate_stream(model: Transformer, prompt: Sequence[int], params: SamplingParams) -> Iterator[int]:
    """Yield new token ids one by one; stops at a stop id (not yielded), max_new_tokens or the context end."""
    if not prompt:
        raise ValueError("empty prompt: at least one token (e.g. BOS) is needed")
    max_len = model.cfg.max_seq_len
    if len(prompt) >= max_len:
        raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context of {max_len}")
    device = next(model.parameters()).device
    budget = min(params.max_new_tokens, max_len - len(prompt))
    cache = KVCache.empty(model.cfg, 1, len(prompt) + budget, device=device, dtype=next(model.parameters()).dtype)
    gen = None
    if params.seed is not None:
        gen = torch.Generator(device=device).manual_seed(params.seed)
    seen = list(prompt)
    logits = model(torch.tensor([list(prompt)], device=device), cache=cache)[0, -1]
    stops = set(params.stop_ids)
    for _ in range(budget):
        token = pick_token(logits, seen, params, gen)
        if token in stops:
            return
        yield token
        seen.append(token)
        if cache.length >= cache.capacity:
            return
        logits = model(torch.tensor([[token]], device=device), cache=cache)[0, -1]


def generate(model: Transformer, prompt: Sequence[int], params: SamplingParams) -> list[int]:
    return list(generate_stream(model, prompt, params))
