"""The serving engine shared by `zagreus chat` and `zagreus serve`: opens a model for chat,
turns conversations into prompt ids under the context policy, runs generations on one worker
thread, and turns token streams back into text (incremental UTF-8, stop strings, tool calls).

Concurrency. A single worker thread is the only caller of the model; request handlers only wait
for its events. By default it interleaves: every request owns its own `generate_stream`
generator and therefore its own KV cache, and the worker advances the running requests
round-robin, one token each per turn. A request therefore computes exactly the operations it
would compute alone (same shapes, same order), so concurrent replies are bit-identical to solo
ones and all of them stream at once; throughput is that of one sequence at a time. With
`batch=True` (`zagreus serve --batch`) the worker decodes all running requests in one forward
per step of a shared `zagreus.model.generate.Decoder` instead (see _Batched): several times the
throughput, but a reply may then differ from its solo version where batch-shaped floating-point
sums break a near-tie. At most `max_active` requests run at once (each holds a KV cache); later
ones wait in arrival order.
Tokenizer calls stay on the caller's side: the server renders and tokenizes prompts on helper
threads and decodes replies on its event loop thread.

Context policy. A prompt must leave room for at least one new token. The server answers a longer
prompt with HTTP 400 (`context_length_exceeded`, as OpenAI does); the terminal chat instead drops
the oldest turns after the system prompt until the conversation fits. `max_tokens` is clipped to
the room left in the context.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from zagreus.checkpoint import load_model_and_tokenizer
from zagreus.errors import UserError
from zagreus.model.generate import Decoder, Sampler, SamplingParams, generate_stream, token_budget
from zagreus.post.chat import TEMPLATES, render, stop_token_ids, template_of, validate_messages

log = logging.getLogger(__name__)

TOOL_CALL_OPEN = "<tool_call>"


class ContextOverflow(ValueError):
    """The prompt leaves no room for a reply in the model's context."""


@dataclass
class Job:
    """One generation running on the worker; `emit` receives ("token", id) events and a final
    ("done", finish_reason) or ("error", message)."""

    prompt: list[int]
    params: SamplingParams
    emit: Callable[[tuple[str, object]], None]
    budget: int
    cancelled: threading.Event = field(default_factory=threading.Event)
    produced: int = 0

    def cancel(self) -> None:
        self.cancelled.set()


class Scheduler:
    """One worker thread that owns every model call and runs the admitted jobs together.

    At most `max_active` jobs run at once (each holds a KV cache sized for its prompt and budget);
    later ones wait in arrival order and allocate nothing until admitted. `batch=False`
    interleaves the running jobs one token each (exactly the solo computation); `batch=True`
    decodes all of them in one forward per step (faster; see _Batched for what it gives up).
    """

    def __init__(self, model, max_active: int = 16, batch: bool = False) -> None:
        if max_active < 1:
            raise UserError(f"--max-running {max_active}: at least one request must be able to run")
        self.model = model
        self.max_active = max_active
        self.batch = batch
        self.running = 0
        self.waiting = 0
        self.peak_running = 0
        self.tokens_generated = 0
        self._inbox: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="zagreus-generate", daemon=True)
        self._thread.start()

    def submit(self, prompt: Sequence[int], params: SamplingParams, emit: Callable[[tuple[str, object]], None]) -> Job:
        prompt = list(prompt)
        job = Job(prompt, params, emit, token_budget(self.model, prompt, params))
        self._inbox.put(job)
        return job

    def close(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=30)

    def token(self, job: Job, token: int) -> bool:
        """Count and hand out a generated token; False when its consumer is gone."""
        job.produced += 1
        self.tokens_generated += 1
        return _deliver(job, ("token", token))

    def _run(self) -> None:
        runner = _Batched(self) if self.batch else _Interleaved(self)
        waiting: deque[Job] = deque()
        while True:
            self.running, self.waiting = len(runner), len(waiting)
            # Block only when idle; otherwise pick up newcomers between steps.
            arrivals = [self._inbox.get()] if not len(runner) and not waiting else []
            while True:
                try:
                    arrivals.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            if None in arrivals:
                for job in runner.jobs() + list(waiting) + [j for j in arrivals if j is not None]:
                    _deliver(job, ("error", "server shutting down"))
                return
            waiting.extend(arrivals)
            # A job cancelled while it waits (its client hung up) leaves the queue now, not at its turn.
            waiting = deque(job for job in waiting if not job.cancelled.is_set())
            while waiting and len(runner) < self.max_active:
                runner.admit(waiting.popleft())
            self.running, self.waiting = len(runner), len(waiting)
            self.peak_running = max(self.peak_running, self.running)
            if len(runner):
                runner.step()


class _Interleaved:
    """Each job its own `generate_stream` (own KV cache); one token of one job per step, round-robin."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.active: deque[tuple[Job, Iterator[int]]] = deque()

    def __len__(self) -> int:
        return len(self.active)

    def jobs(self) -> list[Job]:
        return [job for job, _ in self.active]

    def admit(self, job: Job) -> None:
        self.active.append((job, generate_stream(self.scheduler.model, job.prompt, job.params)))

    def step(self) -> None:
        job, tokens = self.active.popleft()
        if job.cancelled.is_set():
            tokens.close()
            return
        try:
            token = next(tokens)
        except StopIteration:
            _deliver(job, ("done", "length" if job.produced >= job.budget else "stop"))
            return
        except Exception as exc:  # a failing request must not take the worker down
            log.exception("generation failed")
            _deliver(job, ("error", f"generation failed: {exc}"))
            return
        if self.scheduler.token(job, token):
            self.active.append((job, tokens))
        else:
            tokens.close()


@dataclass
class _Row:
    """A job in the batch: its sampler and the token it picked, fed at the next step."""

    job: Job
    sampler: Sampler
    token: int


class _Batched:
    """Batched decode: every running job advances by one token in a single forward.

    A job's prompt is prefilled alone (exactly as `generate_stream` does), then it joins the
    decode batch of a shared `Decoder` (right-aligned entries, own RoPE positions, padding masked).
    The sampling rules are those of `generate_stream` (Sampler: pick_token, stop ids, budget).
    What it gives up: a reply no longer depends only on its own prompt bit for bit, since matrix
    products and attention sums over a batch (and its padding) may round differently than over
    one sequence; a lone request still computes exactly what `generate_stream` computes.
    """

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.decoder = Decoder(scheduler.model)
        self.rows: list[_Row] = []  # the decoder's rows, in order

    def __len__(self) -> int:
        return len(self.rows)

    def jobs(self) -> list[Job]:
        return [r.job for r in self.rows]

    def admit(self, job: Job) -> None:
        token = None
        try:
            sampler = Sampler(job.prompt, job.params, job.budget, self.decoder.device)
            token = self._advance(job, sampler, self.decoder.prefill([job.prompt], [job.budget])[0])
        except Exception as exc:  # a failing request must not take the worker down
            log.exception("prefill failed")
            _deliver(job, ("error", f"generation failed: {exc}"))
        if token is None:
            self.decoder.keep(range(len(self.rows)))  # a finished or failed job leaves no row behind
        else:
            self.rows.append(_Row(job, sampler, token))

    def _advance(self, job: Job, sampler: Sampler, logits) -> int | None:
        """Pick and hand out the job's next token; None when the job is finished."""
        token = sampler.pick(logits)
        if token is None:
            _deliver(job, ("done", "stop"))
            return None
        if not self.scheduler.token(job, token):
            return None
        if not sampler.left:
            _deliver(job, ("done", "length"))
            return None
        return token

    def _keep(self, indices: list[int]) -> None:
        if len(indices) != len(self.rows):
            self.rows = [self.rows[i] for i in indices]
            self.decoder.keep(indices)

    def step(self) -> None:
        self._keep([i for i, r in enumerate(self.rows) if not r.job.cancelled.is_set()])
        if not self.rows:
            return
        try:
            logits = self.decoder.step([r.token for r in self.rows])
            picks = [self._advance(r.job, r.sampler, logits[i]) for i, r in enumerate(self.rows)]
        except Exception as exc:
            log.exception("batched decode failed")
            for r in self.rows:
                _deliver(r.job, ("error", f"generation failed: {exc}"))
            self.rows, self.decoder = [], Decoder(self.scheduler.model)
            return
        for r, token in zip(self.rows, picks):
            if token is not None:
                r.token = token
        self._keep([i for i, token in enumerate(picks) if token is not None])


def _deliver(job: Job, event: tuple[str, object]) -> bool:
    """Hand an event to the job's consumer; a consumer that is gone (closed event loop) cancels it."""
    try:
        job.emit(event)
        return True
    except Exception:
        log.warning("dropping a request whose consumer is gone", exc_info=True)
        job.cancel()
        return False


class TextStream:
    """Token ids in, printable text out: waits for complete UTF-8 characters, cuts at stop strings,
    and withholds everything from a `<tool_call>` marker on (it is returned as structured calls)."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), hold_tool_calls: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.markers = self.stop + ([TOOL_CALL_OPEN] if hold_tool_calls else [])
        self.ids: list[int] = []
        # Decoding restarts at the last complete character (byte-level BPE decodes piecewise), so
        # a long reply costs linear, not quadratic, time.
        self._settled, self._settled_text = 0, ""
        self.text = ""  # decoded text so far, cut at a stop string
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the newly printable text ('' while a character or marker is incomplete)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        tail = self.tokenizer.decode(self.ids[self._settled :])
        if tail.endswith("\ufffd"):
            return ""  # the last token ends inside a multi-byte character
        full = self._settled_text = self._settled_text + tail
        self._settled = len(self.ids)
        for s in self.stop:
            at = full.find(s)
            if at >= 0:
                full, self.stopped = full[:at], True
        self.text = full
        return self._release(final=self.stopped)

    def finish(self) -> str:
        """The whole text once generation has ended (a trailing partial character included)."""
        if not self.stopped:
            self.text = self._settled_text + self.tokenizer.decode(self.ids[self._settled :])
        return self.text

    def flush(self) -> str:
        """Everything not handed out yet, a withheld tool call included (call it when the text
        turned out to hold no well-formed call)."""
        self.finish()
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out

    def _release(self, final: bool) -> str:
        at = self.text.find(TOOL_CALL_OPEN) if TOOL_CALL_OPEN in self.markers else -1
        end = at if at >= 0 else len(self.text)
        if not final and at < 0:
            # Hold back a tail that could still grow into a stop string or a tool-call marker.
            for m in self.markers:
                for k in range(min(len(m) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(m[:k]):
                        end = min(end, len(self.text) - k)
                        break
        end = max(end, self.sent)
        out = self.text[self.sent : end]
        self.sent = end
        return out


def openai_tool_calls(calls: Sequence[dict], prefix: str) -> list[dict]:
    """Parsed calls ({"name", "arguments"}) as OpenAI `tool_calls` entries (arguments as JSON text)."""
    out = []
    for i, call in enumerate(calls):
        args = call.get("arguments", {})
        out.append({
            "id": f"call_{prefix}_{i}",
            "type": "function",
            "function": {"name": call.get("name", ""),
                         "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)},
        })
    return out


class Engine:
    """A model opened for chat: tokenizer, template, stop ids, and the generation worker."""

    def __init__(self, model, tokenizer, template: str = "chatml", name: str = "zagreus", max_active: int = 16,
                 batch: bool = False) -> None:
        if template not in TEMPLATES:
            raise UserError(f"--template {template}: choose one of {', '.join(TEMPLATES)}")
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.name = name
        self.context_length = model.cfg.max_seq_len
        self.stop_ids = list(stop_token_ids(tokenizer, template))
        self.max_active = max_active
        self.batch = batch
        self._scheduler: Scheduler | None = None
        self._lock = threading.Lock()

    # --- prompts ------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], tools: list[dict] | None = None, truncate: bool = False) -> list[int]:
        """Prompt ids for the next assistant turn. Raises ValueError for bad messages and
        ContextOverflow when it does not fit (unless `truncate` drops the oldest turns)."""
        messages = validate_messages(messages)
        while True:
            ids = render(messages, self.tokenizer, template=self.template, tools=tools, add_generation_prompt=True).ids
            if len(ids) < self.context_length:
                return ids
            first = 1 if messages and messages[0]["role"] == "system" else 0
            if not truncate or len(messages) - first <= 1:
                raise ContextOverflow(
                    f"the prompt has {len(ids)} tokens but the model's context is {self.context_length} tokens "
                    "and the reply needs at least one; shorten the messages")
            # Drop the oldest turn after the system prompt: a user message and its replies.
            del messages[first]
            while len(messages) - first > 1 and messages[first]["role"] != "user":
                del messages[first]

    def encode_completion_prompt(self, prompt: str) -> list[int]:
        """A plain-text prompt as the model saw documents in pretraining: BOS, then the text."""
        ids = self.tokenizer.encode(prompt, bos=True)
        if len(ids) >= self.context_length:
            raise ContextOverflow(
                f"the prompt has {len(ids)} tokens but the model's context is {self.context_length} tokens "
                "and the completion needs at least one; shorten the prompt")
        return ids

    def room(self, prompt: Sequence[int]) -> int:
        return self.context_length - len(prompt)

    # --- generation ---------------------------------------------------------------------
    @property
    def scheduler(self) -> Scheduler:
        with self._lock:
            if self._scheduler is None:
                self._scheduler = Scheduler(self.model, self.max_active, self.batch)
            return self._scheduler

    def submit(self, prompt: Sequence[int], params: SamplingParams, emit: Callable[[tuple[str, object]], None]) -> Job:
        return self.scheduler.submit(prompt, params, emit)

    def stats(self) -> dict:
        sched = self._scheduler
        if sched is None:
            return {"running": 0, "waiting": 0, "tokens_generated": 0}
        return {"running": sched.running, "waiting": sched.waiting, "tokens_generated": sched.tokens_generated}

    def close(self) -> None:
        with self._lock:
            if self._scheduler is not None:
                self._scheduler.close()
                self._scheduler = None


def open_engine(path: str | Path, template: str | None = None, name: str | None = None, device: str = "cpu",
                max_active: int = 16, batch: bool = False) -> Engine:
    path = Path(path)
    model, tokenizer = load_model_and_tokenizer(path, device=device)  # a missing path is one clear UserError there
    return Engine(model, tokenizer, template_of(path, template), name or path.resolve().name, max_active=max_active,
                  batch=batch)
