"""Token generation with the KV cache: greedy or sampled (temperature, top-k, top-p,
repetition penalty), streamed one token at a time, stopping on end-of-turn ids.

`Decoder` is the one incremental decoder: a batch of sequences of their own lengths sharing one
KV cache, prefilled together or joining later, stepped one token per row. `Sampler` is one
sequence's token picking (seen ids, seeded generator, stop ids, budget). `generate_stream` (a
batch of one), lm-eval's `generate_until` and the server's batched runner are built on the two.
"""

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


def argmax_rows(logits: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """logits.argmax(-1) of [rows, vocab] logits: the same ids (the first of equal maxima), faster on CPU.

    torch's CPU argmax is not vectorised (2.2 ms for 16 rows of a 128k vocabulary, one thread) and
    its amax is (0.2 ms). So: the maxima of blocks of `block` entries, the first block holding the
    row's maximum (argmax over the block maxima), and the argmax within that block (0.4 ms in all).
    """
    rows, vocab = logits.shape
    if logits.device.type != "cpu" or vocab < 8 * block:
        return logits.argmax(-1)
    whole = vocab // block * block
    maxima = logits[:, :whole].view(rows, -1, block).amax(-1)
    if whole < vocab:
        maxima = torch.cat([maxima, logits[:, whole:].amax(-1, keepdim=True)], 1)
    start = maxima.argmax(-1) * block
    cols = start[:, None] + torch.arange(block)
    inside = cols < vocab
    within = logits.gather(1, cols.clamp(max=vocab - 1)).masked_fill(~inside, float("-inf"))
    return start + within.argmax(-1)


def token_budget(model: Transformer, prompt: Sequence[int], params: SamplingParams) -> int:
    """How many tokens a reply to `prompt` may have: max_new_tokens, clipped to the context left."""
    return min(params.max_new_tokens, model.cfg.max_seq_len - len(prompt))


class Sampler:
    """One sequence's token picking: the ids it has seen (repetition penalty), its own seeded
    generator (so a seeded reply does not depend on what it is batched with), its stop ids, and
    `left`, how many tokens it may still produce."""

    def __init__(self, prompt: Sequence[int], params: SamplingParams, budget: int, device) -> None:
        self.params = params
        self.seen = list(prompt)
        self.left = budget
        self.stops = frozenset(params.stop_ids)
        self.gen = None if params.seed is None else torch.Generator(device=device).manual_seed(params.seed)

    @property
    def greedy(self) -> bool:
        """Whether the pick is the plain argmax of the logits (so a batch's rows can be picked in one op)."""
        return self.params.temperature <= 0 and self.params.repetition_penalty == 1.0

    def pick(self, logits: torch.Tensor) -> int | None:
        """The next token from the logits [vocab] of the last position; None at a stop id."""
        return self.take(pick_token(logits, self.seen, self.params, self.gen))

    def take(self, token: int) -> int | None:
        """Record a picked token (e.g. the argmax of a whole batch's logits, for greedy rows); None at a stop id."""
        if token in self.stops:
            return None
        self.seen.append(token)
        self.left -= 1
        return token


@dataclass
class _Row:
    """A decoder row: `length` tokens cached in row `index` of `cache`, right-aligned at its end."""

    cache: KVCache
    index: int
    length: int
    room: int  # tokens it may still be fed


class Decoder:
    """Incremental decoding of a batch of sequences over one KV cache.

    Rows have their own lengths. Each row's entries are right-aligned at the cache's length (so
    shorter rows are left-padded), it has its own RoPE positions (0 for its first token) and a
    mask hides its padding; a step feeds every row one token at the same cache slot. `prefill`
    adds rows, `keep` drops rows; the shared cache is rebuilt at the next step after either, so
    joins and leaves between two steps cost one copy. Without padding no mask is passed, so a
    lone sequence computes exactly what an unbatched forward with the cache computes.
    """

    def __init__(self, model: Transformer) -> None:
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.rows: list[_Row] = []

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], budgets: Sequence[int]) -> torch.Tensor:
        """Add one row per prompt, prefilled together in one forward (left-padded), with room in
        the cache for budgets[i] more tokens. Returns the logits of each prompt's next position,
        [len(prompts), vocab]."""
        max_len = self.model.cfg.max_seq_len
        for prompt in prompts:
            if not prompt:
                raise ValueError("empty prompt: at least one token (e.g. BOS) is needed")
            if len(prompt) >= max_len:
                raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context of {max_len}")
        n, width = len(prompts), max(map(len, prompts))
        cache = KVCache.empty(self.model.cfg, n, width + max(budgets), device=self.device, dtype=self.dtype)
        tokens = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], device=self.device)
        positions = mask = None
        if any(len(p) < width for p in prompts):
            pads = torch.tensor([width - len(p) for p in prompts])
            steps = torch.arange(width)
            positions = (steps[None] - pads[:, None]).clamp(min=0).to(self.device)
            real = steps[None] >= pads[:, None]
            # Causal over real tokens; a padding query sees itself only, so softmax never meets an empty row.
            causal = torch.ones(width, width, dtype=torch.bool).tril()
            mask = (causal[None] & real[:, None] | torch.eye(width, dtype=torch.bool))[:, None].to(self.device)
        # Only the last position goes through the output matrix: [n, width, vocab] logits would
        # cost a 128k-vocabulary model more than the prompt's whole forward. (Models that only
        # share the calling convention, e.g. serve.llama_cpp's, return their last logits anyway.)
        if isinstance(self.model, Transformer) and self.model.lm_head is not None:
            hidden = self.model(tokens, positions=positions, mask=mask, cache=cache, return_hidden=True)[:, -1]
            logits = self.model.lm_head(hidden)
        else:
            logits = self.model(tokens, positions=positions, mask=mask, cache=cache)[:, -1]
        self.rows += [_Row(cache, i, len(p), budget) for i, (p, budget) in enumerate(zip(prompts, budgets))]
        return logits

    def keep(self, indices: Sequence[int]) -> None:
        """Keep only the rows at these indices, in this order; the others are dropped."""
        self.rows = [self.rows[i] for i in indices]

    @torch.inference_mode()
    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """Feed one token to every row; returns the logits of each row's next position, [rows, vocab]."""
        if len(tokens) != len(self.rows):
            raise ValueError(f"{len(tokens)} tokens for {len(self.rows)} rows")
        cache = self._shared_cache()
        lengths = torch.tensor([r.length for r in self.rows])
        mask = None
        if any(r.length < cache.length for r in self.rows):
            # Each row sees its own entries and the new token, not the padding before them.
            mask = torch.arange(cache.length + 1)[None] >= cache.length - lengths[:, None]
            mask = mask[:, None, None].to(self.device)
        feed = torch.tensor(list(tokens), device=self.device)[:, None]
        logits = self.model(feed, positions=lengths[:, None].to(self.device), mask=mask, cache=cache)[:, -1]
        for r in self.rows:
            r.length += 1
            r.room -= 1
        return logits

    def _shared_cache(self) -> KVCache:
        """The cache every row sits in, in order; after rows joined or left, a new one that holds
        their entries right-aligned at the longest row's length, with room for their budgets."""
        first = self.rows[0].cache
        if len(self.rows) == first.keys[0].shape[0] and all(r.cache is first and r.index == i
                                                            for i, r in enumerate(self.rows)):
            return first
        longest = max(r.length for r in self.rows)
        new = KVCache.empty(self.model.cfg, len(self.rows), longest + max(r.room for r in self.rows),
                            device=self.device, dtype=self.dtype)
        new.length = longest
        groups: dict[int, list[tuple[int, _Row]]] = {}
        for i, r in enumerate(self.rows):
            groups.setdefault(id(r.cache), []).append((i, r))
        for members in groups.values():
            old = members[0][1].cache
            # One block copy per source cache: the columns that hold its kept rows' entries.
            width = max(r.length for _, r in members)
            dst = torch.tensor([i for i, _ in members], device=self.device)
            src = torch.tensor([r.index for _, r in members], device=self.device)
            into, out_of = slice(longest - width, longest), slice(old.length - width, old.length)
            for layer in range(len(new.keys)):
                new.keys[layer][dst, :, into] = old.keys[layer][src, :, out_of]
                new.values[layer][dst, :, into] = old.values[layer][src, :, out_of]
        for i, r in enumerate(self.rows):
            r.cache, r.index = new, i
        return new


@torch.inference_mode()
def generate_stream(model: Transformer, prompt: Sequence[int], params: SamplingParams) -> Iterator[int]:
    """Yield new token ids one by one; stops at a stop id (not yielded), max_new_tokens or the context end."""
    decoder = Decoder(model)
    sampler = Sampler(prompt, params, token_budget(model, prompt, params), decoder.device)
    logits = decoder.prefill([prompt], [sampler.left])
    while (token := sampler.pick(logits[0])) is not None:
        yield token
        if not sampler.left:
            return
        logits = decoder.step([token])


def generate(model: Transformer, prompt: Sequence[int], params: SamplingParams) -> list[int]:
    return list(generate_stream(model, prompt, params))
