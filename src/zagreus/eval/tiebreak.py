"""Close calls decided the way lm-eval's `hf` model (HFLM) decides them.

Our scorer (`zagreus.eval.scorer`) packs an item's choices into one row and projects only the
positions that predict continuation tokens. Its sums equal HFLM's to a few units in the last
place of fp32 (measured up to 7.5e-5 on sums of about -120, 128k vocabulary), but not bit for
bit, and on a near tie that flips a decision. HFLM is not consistent with itself either: the
same request gives other last bits at another batch size, because a row's result depends on
the width its batch is padded to. So "the way lm-eval decides" means HFLM at the same batch
size, and after the fast pass:

1. **Calibrate.** A spread sample of requests is scored again as HFLM scores them. The largest
   difference per continuation token, times SAFETY, bounds the error of every fast score
   (times its token count).
2. **Find the close calls.** An item (one document of one task) is close when the pick of any
   of lm-eval's multiple-choice metrics could change within that bound: the raw sum (acc), the
   sum per character or per UTF-8 byte of the choice (acc_norm, acc_bytes), conditional minus
   unconditional (acc_mutual_info). A request is close on its own when its greedy margin is
   within the bound (is_greedy, exact_match).
3. **Re-score** every request of a close item in HFLM's layout: one unpacked sequence per
   request, left-truncated as HFLM does, right-padded to the width of the batch HFLM puts it in
   (lm-eval's own Collator decides that), full-vocabulary log_softmax in the model's dtype,
   summed in that dtype. One row per forward pass, so memory stays at one row's logits.
   Our model's plain forward does, op for op, what transformers' LlamaForCausalLM does on such
   a row, and its logits are the same bit for bit (tests/test_eval_tiebreak.py checks this
   against transformers for tied and untied heads, GQA and Llama-3 RoPE scaling). So the
   re-scoring runs our model itself: no second model, and no 2 s transformers import.

On CPU a row's numbers depend on its padded width but not on the other rows of its batch
(checked bitwise), so this reproduces HFLM's numbers exactly. On a GPU the kernels may also
depend on the batch's row count, so agreement there is to within that.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Hashable, Sequence

import torch

from zagreus.eval.scorer import PairScores
from zagreus.model.llama import Transformer

log = logging.getLogger(__name__)

# The bound is the largest per-token difference seen in the sample, times this. The sample's
# maximum underestimates the population's; with 4x every decision of the eight benchmark runs
# equalled HFLM's (docs/benchmarks.md).
SAFETY = 4.0
# No bound below about 8 units in the last place of a log-probability near -12 in fp32.
MIN_PER_TOKEN = 8 * 2.0 ** -20

Request = tuple[tuple[str, str] | None, Sequence[int], Sequence[int]]  # lm-eval's (strings, ctx ids, cont ids)


@dataclass
class TiebreakReport:
    """What the tiebreak did in one loglikelihood call: for the results file."""

    requests: int = 0
    calibrated: int = 0
    per_token_bound: float = 0.0
    rescored_requests: int = 0
    rescored_items: Counter = field(default_factory=Counter)  # task -> close items re-scored
    seconds: float = 0.0  # the tiebreak's own time: calibration, re-scoring

    def merge(self, other: "TiebreakReport") -> None:
        self.requests += other.requests
        self.calibrated += other.calibrated
        self.per_token_bound = max(self.per_token_bound, other.per_token_bound)
        self.rescored_requests += other.rescored_requests
        self.rescored_items.update(other.rescored_items)
        self.seconds += other.seconds

    def as_dict(self) -> dict:
        return {"requests": self.requests, "calibrated": self.calibrated, "per_token_bound": self.per_token_bound,
                "rescored_requests": self.rescored_requests, "rescored_items": dict(self.rescored_items),
                "seconds": round(self.seconds, 2)}


def hflm_widths(requests: Sequence[Request], batch_size: int, max_len: int) -> list[int]:
    """The width HFLM pads each request's row to: lm-eval's Collator (sorted by length, one row
    per shared context + continuation[:-1]) in batches of batch_size; a batch is as wide as
    its first, longest row."""
    from lm_eval.models.utils import Collator

    def row_len(req: Request) -> int:
        return min(len(req[1]) + len(req[2]), max_len + 1) - 1

    def sort_key(req: Request):
        toks = list(req[1]) + list(req[2])
        return -len(toks), tuple(toks)

    collator = Collator(list(requests), sort_fn=sort_key, group_by="contexts",
                        group_fn=lambda req: list(req[1]) + list(req[2])[:-1])
    width_of_row: dict[tuple[int, ...], int] = {}
    for chunk in collator.get_batched(n=batch_size):
        width = row_len(chunk[0])
        for req in chunk:
            width_of_row[tuple(req[1]) + tuple(req[2][:-1])] = width
    return [width_of_row[tuple(req[1]) + tuple(req[2][:-1])] for req in requests]


@torch.inference_mode()
def hflm_scores(model: Transformer, requests: Sequence[Request], indices: Sequence[int], widths: Sequence[int],
                max_len: int) -> dict[int, tuple[float, bool]]:
    """HFLM's (log-likelihood, is_greedy) for the chosen requests, computed as HFLM computes them.

    One row per forward pass: on CPU the row's numbers are those of HFLM's batch all the same,
    and memory stays at one row's full-vocabulary logits whatever the batch size.
    """
    import torch.nn.functional as F

    device = next(model.parameters()).device
    out: dict[int, tuple[float, bool]] = {}
    for i in indices:
        _, ctx, cont = requests[i]
        inp = (list(ctx) + list(cont))[-(max_len + 1):][:-1]
        tokens = torch.zeros(1, widths[i], dtype=torch.long)
        tokens[0, :len(inp)] = torch.tensor(inp)
        logprobs = F.log_softmax(model(tokens.to(device)), dim=-1)
        target = torch.tensor(list(cont), device=device)
        picked = logprobs[0, len(inp) - len(target):len(inp)]
        greedy = bool((picked.argmax(dim=-1) == target).all())
        out[i] = (float(picked.gather(1, target[:, None]).sum()), greedy)
    return out


def calibration_sample(n: int) -> list[int]:
    """About 0.5% of the requests (16 to 32), evenly spread: each costs what HFLM pays for it."""
    k = min(n, max(16, min(32, math.ceil(n / 200))))
    return sorted({round(j * (n - 1) / max(k - 1, 1)) for j in range(k)})


def _could_flip(values: Sequence[float], errors: Sequence[float]) -> bool:
    """Whether the argmax of values could change if each moved by up to its error."""
    top = max(range(len(values)), key=values.__getitem__)
    return any(j != top and values[top] - values[j] <= errors[top] + errors[j] for j in range(len(values)))


def _item_is_close(requests: Sequence[Request], members: list[int], logprob: Sequence[float],
                   error: Sequence[float]) -> bool:
    """Close for any of lm-eval's multiple-choice picks (see the module docstring)."""
    strings = [requests[i][0] for i in members]
    if len(members) < 2 or any(s is None for s in strings):
        return False
    conditional = [i for i, (ctx, _) in zip(members, strings) if ctx != ""]
    unconditional = [i for i, (ctx, _) in zip(members, strings) if ctx == ""]
    if len(conditional) == len(unconditional) and conditional:
        # acc_mutual_info: lm-eval appends ("", continuation) for every choice.
        mutual = [logprob[c] - logprob[u] for c, u in zip(conditional, unconditional)]
        if _could_flip(mutual, [error[c] + error[u] for c, u in zip(conditional, unconditional)]):
            return True
    chosen = conditional or members
    conts = [requests[i][0][1] for i in chosen]
    # lm-eval scores delimiter + choice but divides by the choice's length; the delimiter is
    # within the whitespace every continuation starts with, so try each length it could have.
    delimiter = min(len(c) - len(c.lstrip()) for c in conts)
    weights = [[1.0] * len(conts)]
    for cut in range(delimiter + 1):
        weights.append([max(len(c[cut:]), 1) for c in conts])
        weights.append([max(len(c[cut:].encode("utf-8")), 1) for c in conts])
    for w in weights:
        if _could_flip([logprob[i] / wi for i, wi in zip(chosen, w)], [error[i] / wi for i, wi in zip(chosen, w)]):
            return True
    return False


def decide_close_calls(model: Transformer, requests: Sequence[Request], scores: PairScores,
                       items: Sequence[tuple[str, Hashable]], batch_size: int,
                       ) -> tuple[list[tuple[float, bool]], TiebreakReport]:
    """The fast results, with the calibration sample and every close call in HFLM's numbers.

    items: (task, document id) of each request; requests of one item are its choices.
    """
    start = time.perf_counter()
    n = len(requests)
    report = TiebreakReport(requests=n)
    results = scores.results()
    if not n:
        return results, report
    max_len = model.cfg.max_seq_len
    widths = hflm_widths(requests, batch_size, max_len)
    sample = calibration_sample(n)
    reference = hflm_scores(model, requests, sample, widths, max_len)
    n_tokens = [len(cont) for _, _, cont in requests]
    worst = max(abs(reference[i][0] - scores.logprob[i]) / n_tokens[i] for i in sample)
    per_token = max(SAFETY * worst, MIN_PER_TOKEN)
    report.calibrated, report.per_token_bound = len(sample), per_token
    error = [per_token * k for k in n_tokens]

    members: dict[tuple[str, Hashable], list[int]] = {}
    for i, item in enumerate(items):
        members.setdefault(item, []).append(i)
    close: set[int] = set()
    for item, group in members.items():
        greedy_close = any(scores.greedy_margin[i] <= 2 * per_token for i in group)
        if greedy_close or _item_is_close(requests, group, scores.logprob, error):
            close.update(group)
            report.rescored_items[item[0]] += 1
    todo = sorted(close - reference.keys())
    reference.update(hflm_scores(model, requests, todo, widths, max_len))
    report.rescored_requests = len(close)
    for i, value in reference.items():
        results[i] = value
    report.seconds = time.perf_counter() - start
    log.info("tiebreak: bound %.2e per token from %d sampled requests; %d of %d requests re-scored in "
             "HFLM's layout (%d close items)", per_token, len(sample), len(close), n, sum(report.rescored_items.values()))
    return results, report
