"""The OpenAI-compatible HTTP server: `/v1/chat/completions` (plain and SSE streaming, tool
calls), `/v1/completions`, `/v1/models`, `/health`, and the web chat page at `/`.

Generation runs on the engine's single worker thread (see zagreus.serve.engine for the
concurrency design); request handlers only wait on their own event queue, and parsing, validation
and tokenization run on helper threads, so the event loop stays free for every other client. A
request whose client hangs up is cancelled, streaming or not. Errors follow OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`: malformed JSON, unknown roles or bad fields
give 400, a prompt longer than the context gives 400 with code `context_length_exceeded`, a
missing or wrong API key 401, an unknown model name 404, a body over the size limit 413.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any, AsyncIterator, Awaitable, Callable, Literal

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect

from zagreus.model.generate import SamplingParams
from zagreus.post.chat import parse_tool_calls
from zagreus.serve.engine import ContextOverflow, Engine, TextStream, openai_tool_calls

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What the server lets a client ask for; `zagreus serve` sets them from its flags."""

    max_request_bytes: int = 1 << 20  # a larger body gets 413, refused from Content-Length before it is read
    max_tokens: int = 2048  # new tokens per request: a larger max_tokens (or none) is clamped to it
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer KEY" (401 otherwise)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


StopString = Annotated[str, Field(max_length=256)]


class _Sampling(BaseModel):
    """Fields common to both endpoints; top_k and repetition_penalty extend OpenAI's set. Numbers
    are finite and bounded where the model would otherwise fail on them (the seed seeds a 64-bit
    generator); `stop` is bounded because every stop string is searched at every token."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    logprobs: bool | int | None = None


class ChatRequest(_Sampling):
    messages: list[Any]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


def _parse(model: type[BaseModel], raw: bytes) -> Any:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # ValueError also covers integers of over 4,300 digits
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or None
        raise APIError(400, f"{where}: {err['msg']}" if where else err["msg"], param=where) from None


def _params(engine: Engine, req: _Sampling, prompt: list[int], stop_ids: list[int], cap: int) -> SamplingParams:
    asked = req.max_completion_tokens or req.max_tokens or cap
    # max_tokens is clipped to the per-request cap and to the room left in the context, never an error.
    max_new = min(asked, cap, engine.room(prompt))
    return SamplingParams(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                          repetition_penalty=req.repetition_penalty, max_new_tokens=max_new,
                          stop_ids=tuple(stop_ids), seed=req.seed)


def _stops(req: _Sampling) -> list[str]:
    if req.stop is None:
        return []
    return [req.stop] if isinstance(req.stop, str) else list(req.stop)


class Generation:
    """One request's generation seen from the event loop: text pieces as they become printable."""

    def __init__(self, engine: Engine, prompt: list[int], params: SamplingParams, stop: list[str],
                 hold_tool_calls: bool) -> None:
        self.prompt = prompt
        self.text = TextStream(engine.tokenizer, stop, hold_tool_calls=hold_tool_calls)
        self.finish_reason: str | None = None
        loop = asyncio.get_running_loop()
        self._events: asyncio.Queue = asyncio.Queue()
        self._job = engine.submit(prompt, params, lambda ev: loop.call_soon_threadsafe(self._events.put_nowait, ev))

    @property
    def completion_tokens(self) -> int:
        return len(self.text.ids)

    async def pieces(self) -> AsyncIterator[str]:
        """Printable text as it comes; ends with finish_reason set. Cancels the job if abandoned."""
        try:
            while True:
                kind, value = await self._events.get()
                if kind == "error":
                    raise APIError(500, str(value), kind="server_error")
                if kind == "done":
                    self.finish_reason = value
                    return
                piece = self.text.push(value)
                if piece:
                    yield piece
                if self.text.stopped:
                    self.finish_reason = "stop"
                    return
        finally:
            self._job.cancel()  # a no-op once the job has finished

    async def run(self) -> str:
        async for _ in self.pieces():
            pass
        return self.text.finish()

    def usage(self) -> dict:
        return {"prompt_tokens": len(self.prompt), "completion_tokens": self.completion_tokens,
                "total_tokens": len(self.prompt) + self.completion_tokens}


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


class _Reply:
    """The id, creation time and model that every object of one response carries."""

    def __init__(self, prefix: str, model: str) -> None:
        self.id, self.created, self.model = f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time()), model

    def obj(self, kind: str, **fields: Any) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, **fields}


def _sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    """`events` as server-sent events ending in [DONE]; an error once the stream has begun (its 200
    is sent) becomes an error event."""

    async def guarded() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except APIError as exc:
            yield _sse(exc.body())
        yield _sse("[DONE]")

    return StreamingResponse(guarded(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _tool_calls(text: str, reply: _Reply) -> tuple[str, list[dict]]:
    content, calls = parse_tool_calls(text)
    return content, openai_tool_calls(calls, reply.id[-8:])


async def _chat_reply(gen: Generation, reply: _Reply) -> dict:
    text = await gen.run()
    content, calls = _tool_calls(text, reply)
    message: dict[str, Any] = {"role": "assistant", "content": text}
    finish = gen.finish_reason
    if calls:
        message = {"role": "assistant", "content": content or None, "tool_calls": calls}
        finish = "tool_calls"
    return reply.obj("chat.completion", choices=[{"index": 0, "message": message, "finish_reason": finish,
                                                  "logprobs": None}], usage=gen.usage())


async def _chat_events(gen: Generation, reply: _Reply, include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: dict, finish: str | None = None) -> str:
        return _sse(reply.obj("chat.completion.chunk",
                              choices=[{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]))

    yield chunk({"role": "assistant", "content": ""})
    async for piece in gen.pieces():
        yield chunk({"content": piece})
    finish = gen.finish_reason
    _, calls = _tool_calls(gen.text.finish(), reply)
    if calls:
        yield chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]})
        finish = "tool_calls"
    else:
        tail = gen.text.flush()
        if tail:
            yield chunk({"content": tail})
    yield chunk({}, finish)
    if include_usage:
        yield _sse(reply.obj("chat.completion.chunk", choices=[], usage=gen.usage()))


def _text_choice(text: str, finish: str | None) -> dict:
    return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}


async def _completion_reply(gen: Generation, reply: _Reply) -> dict:
    text = await gen.run()
    return reply.obj("text_completion", choices=[_text_choice(text, gen.finish_reason)], usage=gen.usage())


async def _completion_events(gen: Generation, reply: _Reply) -> AsyncIterator[str]:
    async for piece in gen.pieces():
        yield _sse(reply.obj("text_completion", choices=[_text_choice(piece, None)]))
    yield _sse(reply.obj("text_completion", choices=[_text_choice(gen.text.flush(), gen.finish_reason)]))


async def _disconnected(request: Request) -> None:
    """Return once the client has hung up: uvicorn answers a receive after the body with that."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, reply: Awaitable[dict]) -> dict | Response:
    """The finished reply, or, once its client hangs up, an empty response that nobody reads and
    the generation cancelled (pieces() cancels the job as the task unwinds). Starlette watches the
    connection under a streaming response; under a plain one nothing else would."""
    work, gone = asyncio.ensure_future(reply), asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        work.cancel()  # a no-op once the reply is done
    if work in done:
        return work.result()
    await asyncio.wait((work,))
    return Response(status_code=204)


class _Routes:
    """The route handlers for one engine."""

    def __init__(self, engine: Engine, limits: Limits) -> None:
        self.engine = engine
        self.limits = limits
        self.page = resources.files("zagreus.serve").joinpath("static/chat.html").read_text(encoding="utf-8")

    async def authorize(self, request: Request) -> None:
        """The dependency of every /v1 route: with an API key set, the request must carry it."""
        key = self.limits.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise APIError(401, "this server needs an API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def _body(self, request: Request) -> bytes:
        """The request body up to the size limit: a declared Content-Length over it is refused
        before a byte is read, a chunked body as soon as it grows past it. uvicorn then reads and
        drops the rest, so the client gets the 413 and memory never holds more than the limit."""
        limit = self.limits.max_request_bytes
        too_large = APIError(413, f"the request body is larger than this server's limit of {limit} bytes",
                             code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_large
        except ClientDisconnect:  # gone mid-upload: the answer goes nowhere, but no 500 traceback
            raise APIError(400, "the client disconnected before sending the whole body") from None
        return bytes(body)

    async def health(self) -> dict:
        e = self.engine
        return {"status": "ok", "model": e.name, "context_length": e.context_length, "template": e.template,
                "batch": e.batch, **e.stats()}

    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.engine.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "zagreus", "context_length": self.engine.context_length}]}

    async def index(self) -> str:
        return self.page

    def _check(self, req: _Sampling) -> None:
        """What the schema cannot say: the model served here, and fields this server does not support."""
        if req.model is not None and req.model != self.engine.name:
            raise APIError(404, f"model '{req.model}' is not served here; this server serves '{self.engine.name}'",
                           param="model", code="model_not_found")
        if req.logprobs:
            raise APIError(400, "logprobs: not supported by this server", param="logprobs")

    def _chat_prompt(self, req: ChatRequest) -> list[int]:
        try:
            # tool_choice "none" means the model must answer in prose: the tools are not offered.
            return self.engine.render_chat(req.messages, tools=None if req.tool_choice == "none" else req.tools)
        except ContextOverflow as exc:
            raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from None
        except (ValueError, RecursionError) as exc:  # RecursionError: tools nested too deep to print
            raise APIError(400, str(exc), param="messages") from None

    def _completion_prompt(self, req: CompletionRequest) -> list[int]:
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise APIError(400, f"prompt: one prompt per request is supported, got {len(prompts)}", param="prompt")
        try:
            return self.engine.encode_completion_prompt(prompts[0])
        except ContextOverflow as exc:
            raise APIError(400, str(exc), param="prompt", code="context_length_exceeded") from None

    def _prepare(self, raw: bytes, kind: type[_Sampling], prompt_of: Callable[[Any], list[int]],
                 stop_ids: list[int]) -> tuple[Any, list[int], SamplingParams]:
        """The request, its prompt ids and sampling parameters; runs on a helper thread."""
        req = _parse(kind, raw)
        self._check(req)
        prompt = prompt_of(req)
        return req, prompt, _params(self.engine, req, prompt, stop_ids, self.limits.max_tokens)

    # No return annotations: FastAPI would build a response model from dict | StreamingResponse and fail.
    async def chat_completions(self, request: Request):
        raw = await self._body(request)
        # Off the event loop: a megabyte of JSON to validate and tokenize takes about a second.
        req, prompt, params = await asyncio.to_thread(self._prepare, raw, ChatRequest, self._chat_prompt,
                                                      self.engine.stop_ids)
        gen = Generation(self.engine, prompt, params, _stops(req), hold_tool_calls=True)
        reply = _Reply("chatcmpl", self.engine.name)
        log.info("%s: chat, %d prompt tokens, max %d new", reply.id, len(prompt), params.max_new_tokens)
        if not req.stream:
            return await _unless_disconnected(request, _chat_reply(gen, reply))
        return _sse_response(_chat_events(gen, reply, bool((req.stream_options or {}).get("include_usage"))))

    async def completions(self, request: Request):
        raw = await self._body(request)
        req, prompt, params = await asyncio.to_thread(self._prepare, raw, CompletionRequest, self._completion_prompt,
                                                      [self.engine.tokenizer.eos_id])
        gen = Generation(self.engine, prompt, params, _stops(req), hold_tool_calls=False)
        reply = _Reply("cmpl", self.engine.name)
        log.info("%s: completion, %d prompt tokens, max %d new", reply.id, len(prompt), params.max_new_tokens)
        if not req.stream:
            return await _unless_disconnected(request, _completion_reply(gen, reply))
        return _sse_response(_completion_events(gen, reply))


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def create_app(engine: Engine, limits: Limits = Limits()) -> FastAPI:
    """The FastAPI app serving `engine` under `limits`."""
    app = FastAPI(title="zagreus", description=f"OpenAI-compatible server for {engine.name}")
    routes = _Routes(engine, limits)
    app.add_exception_handler(APIError, _api_error)
    guarded = [Depends(routes.authorize)]
    app.get("/health")(routes.health)
    app.get("/v1/models", dependencies=guarded)(routes.models)
    app.get("/", response_class=HTMLResponse)(routes.index)
    app.post("/v1/chat/completions", dependencies=guarded)(routes.chat_completions)
    app.post("/v1/completions", dependencies=guarded)(routes.completions)
    return app


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits(),
          log_level: Literal["info", "warning"] = "info") -> None:
    """Run the server until interrupted."""
    app = create_app(engine, limits)
    # What is loaded by now (torch, the model, the app) lives as long as the server: frozen out of the
    # collector's reach, a full collection takes milliseconds instead of stalling the event loop ~150 ms.
    gc.freeze()
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        engine.close()
