"""`zagreus` model type for lm-evaluation-harness: our checkpoints and exports, in process.

`lm-eval --model zagreus --model_args pretrained=PATH` (or `ZagreusLM(model=..., tokenizer=...)`)
scores with `zagreus.eval.scorer` (packed choices, output matrix only where needed) and
generates in batches with `zagreus.model.generate`'s Decoder and Sampler. Tokenisation
reproduces lm-eval's `hf` model on our exported tokenizer: its post-processor prepends
<|begin_of_text|> to every encoded string (unless the string already starts with it) and
special-token strings in the text are recognised, so both paths feed the model the same ids.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Collection

from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from zagreus.checkpoint import load_model_and_tokenizer
from zagreus.devices import pick_device
from zagreus.errors import UserError
from zagreus.eval.scorer import score_pairs
from zagreus.eval.tiebreak import TiebreakReport, decide_close_calls
from zagreus.model.generate import Decoder, Sampler, SamplingParams, argmax_rows, token_budget
from zagreus.recipe import EVAL_BATCH_SIZE
from zagreus.tokenizer import BOS

log = logging.getLogger(__name__)


@register_model("zagreus")
class ZagreusLM(TemplateLM):
    """An lm-eval LM over a zagreus Transformer + Tokenizer.

    batch_size: scoring packs rows up to a budget of batch_size x 256 tokens per forward pass
    (one row holds a context and all its choices); generation decodes batch_size prompts at once.
    Close calls are decided as HFLM at this batch size decides them (`zagreus.eval.tiebreak`);
    tiebreak=False skips that and keeps the fast scores only.
    """

    def __init__(self, pretrained: str | Path | None = None, model=None, tokenizer=None,
                 batch_size: int | str = EVAL_BATCH_SIZE, device: str | None = None, max_length: int | None = None,
                 tiebreak: bool | str = True, **kwargs) -> None:
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ValueError("pass pretrained=PATH (export, checkpoint or run folder) or model= and tokenizer=")
            model, tokenizer = load_model_and_tokenizer(pretrained, device=pick_device(device or "auto"))
        if tokenizer is None:
            raise ValueError("a tokenizer is needed with model=")
        if kwargs:
            log.debug("ignoring model args %s", sorted(kwargs))
        self.model = model.eval()
        self.zt = tokenizer
        self._device = next(model.parameters()).device
        self._max_length = int(max_length or model.cfg.max_seq_len)
        bs = EVAL_BATCH_SIZE if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self.batch_tokens = max(256, bs * 256)
        self.gen_batch = bs
        # A sharded (DTensor) model sums across ranks in its own order: its rows are not HFLM's numbers.
        self.tiebreak = str(tiebreak).lower() not in ("false", "0", "no") and not _sharded(model)
        self.tiebreak_report = TiebreakReport()
        self._items = None  # (task, doc id) per request of the loglikelihood call in flight
        self._encoded: dict[str, list[int]] = {}  # the loglikelihood call in flight's strings, encoded at once
        # As the export's generation_config: end of text, and end of turn for chat models.
        self.stop_ids = tuple(i for i in (tokenizer.eos_id, tokenizer.special_tokens.get("<|im_end|>")) if i is not None)

    def take_tiebreak_report(self) -> TiebreakReport:
        """What the tiebreak did since the last call (close items re-scored per task, ...)."""
        report, self.tiebreak_report = self.tiebreak_report, TiebreakReport()
        return report

    # --- what lm-eval asks of a TemplateLM --------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.zt.eos_id

    @property
    def prefix_token_id(self) -> int:
        # As HFLM: BOS conditions an empty context.
        return self.zt.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        # HFLM: default adds special tokens (our post-processor's BOS) unless the text starts with BOS.
        add_bos = add_special_tokens if add_special_tokens is not None else not string.startswith(BOS)
        body = self._encoded.get(string)
        if body is None:
            ids = self.zt.encode(string, bos=add_bos, allow_special=True)
        else:
            ids = [self.zt.bos_id] + body if add_bos else list(body)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.zt.decode(tokens)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # Which requests are one document's choices is known only here, on lm-eval's Instances.
        self._items = [(req.task_name, req.doc_id) for req in requests]
        self._encoded = self._encode_pairs_at_once(requests)
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._items, self._encoded = None, {}

    def _encode_pairs_at_once(self, requests) -> dict[str, list[int]]:
        """The strings TemplateLM._encode_pair will hand tok_encode (each context once per choice, one
        call each), encoded in one multi-threaded batch; tok_encode encodes any other string itself.
        The trailing-space shift is _encode_pair's own."""
        texts = set()
        for req in requests:
            context, continuation = req.args
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
            texts.update((context, context + continuation))
        ordered = sorted(texts)
        return dict(zip(ordered, self.zt.encode_batch(ordered, allow_special=True)))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        scores = score_pairs(self.model, pairs, batch_tokens=self.batch_tokens, progress=not disable_tqdm)
        results = scores.results()
        if self.tiebreak and self._items is not None and len(self._items) == len(requests):
            results, report = decide_close_calls(self.model, requests, scores, self._items, self.gen_batch)
            self.tiebreak_report.merge(report)
        for (key, _, _), res in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity-style scores: disjoint windows of max_length tokens, summed (as HFLM)."""
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((ctx, cont))
                owners.append(i)
        scores = score_pairs(self.model, windows, batch_tokens=self.batch_tokens, progress=not disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, logp in zip(owners, scores.logprob):
            totals[owner] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations with the KV cache, batched (left-padded), cut at the first stop sequence."""
        eos = self.zt.decode([self.eot_token_id])
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            params = SamplingParams(
                temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                top_p=float(kwargs.get("top_p", 1.0) or 1.0), top_k=int(kwargs.get("top_k", 0) or 0),
                max_new_tokens=max_gen, stop_ids=self.stop_ids, seed=kwargs.get("seed"),
            )
            prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_gen)
                       for i in indices}
            # Longest first, so each batch pads little.
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            for b in range(0, len(order), self.gen_batch):
                batch = order[b:b + self.gen_batch]
                texts = generate_batch(self.model, [prompts[i] for i in batch], params, until, self.zt.decode,
                                       hidden_ids=self.zt.special_tokens.values())
                for i, text in zip(batch, texts):
                    text = postprocess_generated_text(generation=text, stop=until, think_end_token=None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    out[i] = text
                bar.update(len(batch))
        bar.close()
        return out


def _sharded(model) -> bool:
    # No DTensor exists before its module is imported (1.3 s): a process that never did holds none.
    if "torch.distributed.tensor" not in sys.modules:
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def generate_batch(model, prompts: list[list[int]], params: SamplingParams, until: list[str], decode,
                   hidden_ids: Collection[int] = ()) -> list[str]:
    """Decode several prompts at once with one Decoder (its KV cache): each row's text, not yet cut at its stop.

    The text is what HFLM decodes (`skip_special_tokens=True`): `hidden_ids`, the special tokens,
    add no text. A row stops at a stop id, once its text holds a stop string, or after
    max_new_tokens; finished rows leave the batch, so the others step on fewer rows. The stop
    strings are looked for in the decoded tail of the row only, as many tokens as the longest
    stop string has bytes (plus two): a stop string completed by the newest token lies within
    it, since every token adds at least one byte; so each step decodes a few tokens, not the
    whole reply. A hit is confirmed on the whole text before the row stops. Greedy rows are
    picked with one argmax over the batch's logits (`argmax_rows`).
    """
    decoder = Decoder(model)
    samplers = [Sampler(p, params, token_budget(model, p, params), decoder.device) for p in prompts]
    logits = decoder.prefill(prompts, [s.left for s in samplers])
    hidden = frozenset(hidden_ids)
    shown: list[list[int]] = [[] for _ in prompts]  # the ids that decode to text
    tail = max((len(s.encode("utf-8")) for s in until), default=0) + 2
    rows = list(range(len(prompts)))  # the prompt of each decoder row
    greedy = all(s.greedy for s in samplers)

    def stopped(ids: list[int]) -> bool:
        return any(s in decode(ids[-tail:]) for s in until) and any(s in decode(ids) for s in until)

    while True:
        picks = argmax_rows(logits).tolist() if greedy else None
        live, feed = [], []
        for k, i in enumerate(rows):
            token = samplers[i].take(picks[k]) if greedy else samplers[i].pick(logits[k])
            if token is None:
                continue
            if token not in hidden:
                shown[i].append(token)
                if until and stopped(shown[i]):
                    continue
            if samplers[i].left:
                live.append(k)
                feed.append(token)
        if not live:
            return [decode(ids) for ids in shown]
        rows = [rows[k] for k in live]
        decoder.keep(live)
        logits = decoder.step(feed)


def make_lm(model_or_path, tokenizer=None, batch_size: int = EVAL_BATCH_SIZE, device: str | None = None,
            tiebreak: bool = True) -> ZagreusLM:
    """A ZagreusLM from a path or from an in-memory (model, tokenizer)."""
    if isinstance(model_or_path, (str, Path)):
        return ZagreusLM(pretrained=str(model_or_path), batch_size=batch_size, device=device, tiebreak=tiebreak)
    return ZagreusLM(model=model_or_path, tokenizer=tokenizer, batch_size=batch_size, tiebreak=tiebreak)


def make_hf_lm(pretrained: str | Path, batch_size: int = EVAL_BATCH_SIZE, device: str | None = None):
    """lm-eval's own HFLM for any Hugging Face causal LM, a local folder or a hub id (no fast scorer, no tiebreak).

    batch_size counts sequences here (HFLM's meaning), not our x256-token budget.
    """
    from lm_eval.models.huggingface import HFLM  # transformers: only for models that are not ours

    try:
        return HFLM(pretrained=str(pretrained), batch_size=batch_size, device=str(pick_device(device or "auto")))
    except (OSError, ValueError) as exc:  # not on the hub / offline, or an architecture transformers lacks
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{pretrained}: transformers could not open it as a causal LM ({reason}); pass an export, "
                        f"a checkpoint, a run directory, a local Hugging Face folder or a hub id") from None
