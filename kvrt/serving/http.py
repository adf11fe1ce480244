"""`kvrt serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

The HTTP layer only feeds the engine (kvrt.serving.engine): it validates a request, tokenizes it,
submits it, and relays the text pieces as they come, as one JSON reply or as server-sent
events. Blocking engine calls run in worker threads, never on the event loop's thread.
Every bad request is an OpenAI-style JSON error with a 4xx status; a client that goes away
cancels its request, which frees its KV cache at the engine's next step.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health,
GET /metrics (Prometheus text), and vLLM's tokenizer routes POST /tokenize, POST /detokenize and
GET /tokenizer_info (lm-eval-harness's local-completions tokenizes through them). A request may
pick its own cache spec with the extension field `"kvrt": {"cache": "snapkv:budget=1024+ott:bits=2"}`,
and keep out of the prompt cache (kvrt.serving.prompt_cache) with `"kvrt": {"prompt_cache": false}`.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.exceptions import HTTPException

from kvrt.serving.engine import Engine, QueueFull
from kvrt.serving.keys import ApiKeys
from kvrt.errors import InvalidValue, KvrtError
from kvrt.generation.logprobs import MAX_TOP
from kvrt.models.runtime import check_token_ids
from kvrt.serving.logprob_json import chat_logprobs, completion_logprobs
from kvrt.generation.sampling import SamplingParams
from kvrt.cache.spec import CacheSpec

REPLICA = f"{socket.gethostname()}:{os.getpid()}".encode()
MAX_REQUEST_BYTES = 8 * 2**20  # --max-request-bytes' default: a context of token ids or text is far less
STALLED_SECONDS = 120.0  # /health fails when one engine step (a prefill chunk and a decode step) runs longer
POLL_SECONDS = 0.25  # how often a waiting request checks for its client and the engine
LONG_TEXT_CHARS = 2**16  # texts longer than this (~16k tokens of prose) are tokenized one at a time


# --- errors ----------------------------------------------------------------------------------
class ApiError(Exception):
    """An error reply: status, one-line message, the offending field (OpenAI's `param`) and a code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def one_line(text: str) -> str:
    return " ".join(str(text).split()) or "failed"


def log(message: str) -> None:
    print(f"kvrt: {message}", file=sys.stderr, flush=True)


class InternalErrors:
    """ASGI middleware: an unexpected exception in one request is a 500 JSON error and one log line
    (the traceback only with KVRT_DEBUG=1); the server goes on."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True  # every reply names the process that served it (a replica, behind Ray Serve)
                message = {**message, "headers": [*message.get("headers", []), (b"x-kvrt-replica", REPLICA)]}
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            log(f"internal error in {scope.get('path')}: {type(exc).__name__}: {one_line(exc)}")
            if os.environ.get("KVRT_DEBUG"):
                import traceback

                traceback.print_exc()
            if not started:  # once a reply has begun, all we can do is end it
                error = ApiError(500, f"internal error: {type(exc).__name__}: {one_line(exc)}", kind="server_error")
                await error.response()(scope, receive, send)


class RequireKey:
    """ASGI middleware: a request for a guarded path without one of the keys gets 401, OpenAI's way
    (kvrt/serving/keys.py); the app never sees it."""

    def __init__(self, app, keys: ApiKeys):
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.keys.guards(scope["path"]):
            authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not self.keys.allows(authorization):
                error = ApiError(401, "incorrect or missing API key: send the header Authorization: Bearer KEY",
                                 code="invalid_api_key")
                reply = error.response()
                reply.headers["WWW-Authenticate"] = "Bearer"
                return await reply(scope, receive, send)
        await self.app(scope, receive, send)


# --- requests ----------------------------------------------------------------------------------
# fields that change what OpenAI replies (more choices, tool calls): refused unless at their default
UNSUPPORTED = {"n": (1,), "best_of": (1,), "suffix": ("",), "tools": ([],)}


class KvrtOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cache: str | None = None  # a cache spec for this request; the server's --cache when absent
    prompt_cache: bool = True  # false: neither start from the prompt cache nor leave the cache there


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """What /v1/completions and /v1/chat/completions share; other OpenAI fields are ignored."""

    model: str | None = None  # the served model when absent
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)  # OpenAI's default: 1
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0)
    stop: list[str] = []
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    kvrt: KvrtOptions | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def stop_list(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return [value] if value else []
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return value
        raise ValueError("must be a string or a list of strings")

    def scoring(self) -> tuple[int | None, bool]:
        """(alternatives per sampled token when logprobs are asked for, else None; whether the prompt's
        own tokens are scored too)."""
        return None, False

    def params(self) -> SamplingParams:
        return SamplingParams(temp=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed)


class CompletionRequest(Sampling):
    prompt: str | list[int]
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: score the prompt only (lm-eval-harness)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP)  # score each token, with this many alternatives
    echo: bool = False  # the reply's text (and logprobs) start with the prompt's

    def scoring(self) -> tuple[int | None, bool]:
        return self.logprobs, self.echo and self.logprobs is not None

    @field_validator("prompt", mode="before")
    @classmethod
    def one_prompt(cls, value: Any) -> Any:
        """One prompt: a string or token ids (a list holding exactly one of those is unwrapped)."""
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
            value = value[0]
        if isinstance(value, str) or (isinstance(value, list) and value and all(type(t) is int for t in value)):
            return value
        if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
            raise ValueError("one prompt per request: send several prompts as several requests")
        raise ValueError("must be a string or a non-empty list of token ids")


class TokenizeRequest(BaseModel):
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    tokens: list[int]


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def text_parts(cls, value: Any) -> Any:
        """OpenAI's list of content parts, joined into one text (only text parts are supported)."""
        if not isinstance(value, list):
            return value
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"only text content parts ({{'type': 'text', 'text': ...}}) are supported, "
                                 f"got {kind!r}")
            texts.append(part["text"])
        return "".join(texts)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP)

    @model_validator(mode="after")
    def top_needs_logprobs(self) -> "ChatRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def scoring(self) -> tuple[int | None, bool]:
        return (self.top_logprobs or 0) if self.logprobs else None, False


def field_path(loc) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


MAX_JSON_DEPTH = 32  # an OpenAI request nests a few levels; far deeper is an attack on the parser


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 once it passes `limit` bytes: at once when Content-Length says so,
    else as soon as that many have arrived (never read whole)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes; this server takes at most {limit} "
                            "(--max-request-bytes)", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over {limit} bytes (--max-request-bytes)",
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def json_depth(value) -> int:
    """How deeply arrays and objects nest in parsed JSON (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


async def parsed(request: Request, schema: type[BaseModel], limit: int) -> BaseModel:
    """The request body as `schema`, or a 4xx that names the first thing wrong with it."""
    raw = await read_body(request, limit)
    try:
        data = json.loads(raw)
    except RecursionError:  # deeper than the parser goes
        raise ApiError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {one_line(exc)}") from None
    if json_depth(data) > MAX_JSON_DEPTH:
        raise ApiError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name, defaults in UNSUPPORTED.items():
        if data.get(name) not in (None, *defaults):
            raise ApiError(400, f"{name}={json.dumps(data[name])} is not supported by kvrt serve", param=name)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


def validation_error(errors) -> ApiError:
    first = errors[0]
    param = field_path(first["loc"]) or None
    message = first["msg"].removeprefix("Value error, ")
    return ApiError(400, f"{param}: {message}" if param else message, param=param)


# --- the app -----------------------------------------------------------------------------------
class Server:
    """The state every endpoint shares: the model, its engine, the served name and the defaults."""

    def __init__(self, model, engine: Engine, name: str, max_tokens: int = 256,
                 max_request_bytes: int = MAX_REQUEST_BYTES):
        self.model, self.engine, self.name, self.max_tokens = model, engine, name, max_tokens
        self.max_request_bytes = max_request_bytes
        self.created = int(time.time())
        # one worker thread per request waiting on the engine; a request beyond these waits for a thread
        self.threads = anyio.CapacityLimiter(engine.max_batch + engine.max_queue + 8)
        self.long_texts = ThreadPoolExecutor(1, thread_name_prefix="kvrt-long-text")  # see Server.tokenize

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.name:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves '{self.name}'",
                           param="model", code="model_not_found")

    def submit(self, ids: list[int], body: Sampling, max_tokens: int | None):
        """Queue the request on the engine (in a worker thread: tokenizing and checks take a while)."""
        cache = body.kvrt.cache if body.kvrt else None
        prompt_cache = body.kvrt.prompt_cache if body.kvrt else True
        try:
            if cache is not None:
                CacheSpec.parse(cache)
        except InvalidValue as exc:
            raise ApiError(400, str(exc), param="kvrt.cache") from None
        try:
            params = body.params()
        except InvalidValue as exc:
            raise ApiError(400, str(exc)) from None
        if max_tokens is None:  # the server's default, within what the context leaves
            room = (self.model.context_length or 0) - len(ids)
            max_tokens = min(self.max_tokens, room) if room > 0 else self.max_tokens
        logprobs, prompt_logprobs = body.scoring()
        try:
            return self.engine.submit(ids, max_tokens=max_tokens, params=params, cache=cache, stop=body.stop,
                                      prompt_cache=prompt_cache, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        except QueueFull as exc:
            raise ApiError(429, str(exc), code="queue_full", kind="rate_limit_error") from None
        except KvrtError as exc:
            raise ApiError(400, str(exc)) from None

    def check_length(self, chars: int, param: str) -> None:
        """Refuse text that cannot fit the context before tokenizing it (no token covers more than
        the tokenizer's longest), so a huge prompt never holds a worker for long."""
        context = self.model.context_length
        if context and chars > context * self.model.tokenizer.longest_token_chars:
            raise ApiError(400, f"the prompt is {chars} characters, more than the model's context of {context} "
                                "tokens can hold", param=param)

    def completion_ids(self, body: CompletionRequest) -> list[int]:
        if isinstance(body.prompt, str):
            return self.tokenize(len(body.prompt), "prompt", self.model.encode_prompt, body.prompt, chat_template=False)
        check_token_ids(body.prompt, self.model.tokenizer.vocab_size)
        return body.prompt

    def chat_ids(self, body: ChatRequest) -> list[int]:
        roles = {"developer": "system"}  # OpenAI's newer name for the system role
        messages = [{"role": roles.get(m.role, m.role), "content": m.content or ""} for m in body.messages]
        chars = sum(len(m["content"]) for m in messages)
        return self.tokenize(chars, "messages", self.model.tokenizer.encode_chat, messages, add_generation_prompt=True)

    def tokenize(self, chars: int, param: str, encode, *args, **kwargs) -> list[int]:
        """Tokenize a text of `chars` characters (the request's field `param`), once it can fit the
        context (check_length): a short one here, a long one on the one thread for long texts. The
        tokenizer holds some 400 bytes a character at its peak, so long texts go one at a time, and
        always on that thread, whose memory the next one reuses (memory: README, Serving)."""
        self.check_length(chars, param)
        if chars <= LONG_TEXT_CHARS:
            return encode(*args, **kwargs)
        return self.long_texts.submit(encode, *args, **kwargs).result()

    async def start(self, body: Sampling, encode, max_tokens: int | None):
        """Tokenize and submit in a worker thread; encoding errors are the client's (400)."""
        self.check_model(body.model)

        def run():
            try:
                ids = encode(body)
            except KvrtError as exc:
                raise ApiError(400, str(exc), param="messages" if isinstance(body, ChatRequest) else "prompt")
            return ids, self.submit(ids, body, max_tokens)

        return await anyio.to_thread.run_sync(run, limiter=self.threads)

    async def pieces(self, request: Request, handle):
        """The request's text, a batch of pieces at a time, until it finishes; cancels it when the client
        goes away (or this task is cancelled) before that."""
        finished = False
        try:
            while not finished:
                if await request.is_disconnected():
                    return
                pieces, finished = await anyio.to_thread.run_sync(ready_pieces, handle, POLL_SECONDS,
                                                                  limiter=self.threads)
                if pieces:
                    yield "".join(pieces)
                elif not finished and not self.engine.alive:
                    raise ApiError(503, "the engine has stopped", kind="server_error")
        finally:
            if not finished:
                handle.cancel()

    async def completion(self, request: Request, body: Sampling, encode, max_tokens: int | None, chat: bool):
        echo = getattr(body, "echo", False)
        if body.stream and (echo or body.scoring()[0] is not None):
            raise ApiError(400, "logprobs and echo are not supported with stream: true", param="stream")
        ids, handle = await self.start(body, encode, max_tokens)
        reply = Reply(self.name, chat, body.stream_options.include_usage if body.stream_options else False)
        if body.stream:
            return StreamingResponse(reply.events(self.pieces(request, handle), handle),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text = []
        try:
            async for piece in self.pieces(request, handle):
                text.append(piece)
        except KvrtError as exc:
            raise failure(exc) from None
        if echo:
            text.insert(0, body.prompt if isinstance(body.prompt, str) else self.model.tokenizer.decode(ids))
        return JSONResponse(reply.whole("".join(text), handle, self.logprobs(body, handle, ids if echo else None)))

    def logprobs(self, body: Sampling, handle, echoed: list[int] | None) -> dict | None:
        """The reply's `logprobs` object, when the request asked for them."""
        if body.scoring()[0] is None:
            return None
        tokenizer = self.model.tokenizer
        if isinstance(body, ChatRequest):  # a chat reply's end-of-turn token is no part of its content
            return chat_logprobs(tokenizer, [s for s in handle.scores if s.token not in tokenizer.eos_token_ids])
        return completion_logprobs(tokenizer, handle.scores, echoed, handle.prompt_scores)


def failure(exc: KvrtError) -> ApiError:
    """A request the engine failed (a model error, or the server shutting down)."""
    return ApiError(500, str(exc), kind="server_error")


def ready_pieces(handle, wait: float) -> tuple[list[str], bool]:
    """The pieces that arrive within `wait` seconds (all that are ready once one has come) and whether
    the request has finished (raises what the engine failed it with)."""
    pieces = []
    try:
        while (piece := handle.next(timeout=wait)) is not None:
            pieces.append(piece)
            wait = 0
    except queue.Empty:
        return pieces, False
    return pieces, True


class Reply:
    """OpenAI's reply objects for one request: a whole completion, or its stream of chunks."""

    def __init__(self, model: str, chat: bool, include_usage: bool):
        self.model, self.chat, self.include_usage = model, chat, include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    @staticmethod
    def usage(handle) -> dict:
        return {"prompt_tokens": handle.prompt_tokens, "completion_tokens": handle.completion_tokens,
                "total_tokens": handle.prompt_tokens + handle.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": handle.cached_tokens}}

    def whole(self, text: str, handle, logprobs: dict | None = None) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": handle.finish_reason}
            return {**self.envelope("chat.completion", [choice]), "usage": self.usage(handle)}
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": handle.finish_reason}
        return {**self.envelope("text_completion", [choice]), "usage": self.usage(handle)}

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False) -> str:
        if self.chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = self.envelope(self.chunk_object, [choice])
        return event(obj | ({"usage": None} if self.include_usage else {}))

    async def events(self, pieces, handle):
        """Server-sent events: the text chunks, one with the finish reason, usage if asked, then [DONE]."""
        try:
            if self.chat:
                yield self.chunk("", role=True)
            async for piece in pieces:
                yield self.chunk(piece)
            yield self.chunk(None, finish_reason=handle.finish_reason)
            if self.include_usage:
                yield event(self.envelope(self.chunk_object, []) | {"usage": self.usage(handle)})
        except (KvrtError, ApiError) as exc:  # the status line is sent already: the error goes in the stream
            yield event((exc if isinstance(exc, ApiError) else failure(exc)).body())
        yield "data: [DONE]\n\n"


def event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# name in engine.metrics() -> (Prometheus name, type, help)
METRICS = {
    "running": ("kvrt_requests_running", "gauge", "Requests being prefilled or decoded."),
    "waiting": ("kvrt_requests_waiting", "gauge", "Requests queued for admission."),
    "kv_bytes": ("kvrt_kv_bytes", "gauge", "Bytes the running requests' KV caches hold now."),
    "kv_budget_bytes": ("kvrt_kv_budget_bytes", "gauge", "The KV memory budget for admission (0: no limit)."),
    "kv_reserved_bytes": ("kvrt_kv_reserved_bytes", "gauge",
                          "KV bytes reserved by the running requests (each at its longest)."),
    "prompt_tokens_total": ("kvrt_prompt_tokens_total", "counter", "Prompt tokens prefilled."),
    "generation_tokens_total": ("kvrt_generation_tokens_total", "counter", "Tokens generated."),
    "requests_finished_total": ("kvrt_requests_finished_total", "counter",
                                "Requests ended (finished, or cancelled by their client)."),
    "requests_rejected_total": ("kvrt_requests_rejected_total", "counter", "Requests refused with 429 (queue full)."),
    "prompt_tokens_per_second": ("kvrt_prompt_tokens_per_second", "gauge", "Prefill throughput over the last 10 s."),
    "generation_tokens_per_second": ("kvrt_generation_tokens_per_second", "gauge",
                                     "Generation throughput over the last 10 s."),
    "prompt_cache_hits_total": ("kvrt_prompt_cache_hits_total", "counter",
                                "Requests that started from the prompt cache."),
    "prompt_cache_misses_total": ("kvrt_prompt_cache_misses_total", "counter",
                                  "Requests that found nothing to reuse in the prompt cache."),
    "prompt_cache_tokens_reused_total": ("kvrt_prompt_cache_tokens_reused_total", "counter",
                                         "Prompt tokens taken from the prompt cache instead of prefilled."),
    "prompt_cache_bytes": ("kvrt_prompt_cache_bytes", "gauge", "Bytes the prompt cache's entries hold."),
    "prompt_cache_budget_bytes": ("kvrt_prompt_cache_budget_bytes", "gauge",
                                  "The prompt cache's bound (--prompt-cache; 0: off)."),
    "prompt_cache_entries": ("kvrt_prompt_cache_entries", "gauge", "Caches the prompt cache holds."),
}


def prometheus_text(metrics: dict) -> str:
    lines = []
    for key, (name, kind, help_text) in METRICS.items():
        value = metrics[key]
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}",
                  f"{name} {value:.6g}" if isinstance(value, float) else f"{name} {value}"]
    return "\n".join(lines) + "\n"


def build_app(model, engine: Engine, name: str = "default", max_tokens: int = 256,
              keys: ApiKeys | None = None, max_request_bytes: int = MAX_REQUEST_BYTES) -> FastAPI:
    """The HTTP app over a loaded model and its started engine (`name` is the model id clients use;
    `keys`: the API keys its routes need, none by default)."""
    server = Server(model, engine, name, max_tokens, max_request_bytes)
    app = FastAPI(title="kvrt", docs_url=None, redoc_url=None)
    app.add_middleware(RequireKey, keys=keys or ApiKeys())
    app.add_middleware(InternalErrors)  # added last, so outermost: a 401 names its replica too
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):  # unknown paths and methods, OpenAI-style
        return ApiError(exc.status_code, f"{one_line(exc.detail)}: {request.method} {request.url.path}").response()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": server.created,
                                            "owned_by": "kvrt"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parsed(request, CompletionRequest, server.max_request_bytes)
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens 0 generates nothing: it scores the prompt, with echo and logprobs",
                           param="max_tokens")
        return await server.completion(request, body, server.completion_ids, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parsed(request, ChatRequest, server.max_request_bytes)
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await server.completion(request, body, server.chat_ids, max_tokens, chat=True)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tokenizer = model.tokenizer
        return {"eos_token": tokenizer.eos_token, "bos_token": tokenizer.bos_token, "pad_token": None,
                "chat_template": tokenizer.chat_template, "model_max_length": model.context_length}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await parsed(request, TokenizeRequest, server.max_request_bytes)
        encode = model.tokenizer.encode
        ids = await anyio.to_thread.run_sync(lambda: server.tokenize(len(body.prompt), "prompt", encode, body.prompt,
                                                                     body.add_special_tokens), limiter=server.threads)
        return {"tokens": ids, "count": len(ids), "max_model_len": model.context_length}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await parsed(request, DetokenizeRequest, server.max_request_bytes)
        try:
            if body.tokens:
                check_token_ids(body.tokens, model.tokenizer.vocab_size)
        except KvrtError as exc:
            raise ApiError(400, str(exc), param="tokens") from None
        return {"prompt": model.tokenizer.decode(body.tokens)}

    @app.get("/health")
    async def health():
        if not engine.alive:
            return ApiError(503, "the engine has stopped", kind="server_error").response()
        stuck = engine.turn_seconds()
        if stuck > STALLED_SECONDS:
            return ApiError(503, f"the engine has not finished a step for {stuck:.0f} s",
                            kind="server_error").response()
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(engine.metrics()), media_type="text/plain; version=0.0.4")

    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (bound before the model loads, so a taken port fails at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise KvrtError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    return sock


def serve(app: FastAPI, sock: socket.socket, engine: Engine) -> None:
    """Run the app on uvicorn until Ctrl-C or SIGTERM, which stop the engine at once: requests in flight
    end with an error (a stream: an error event), queued ones too, and the server exits."""
    import uvicorn

    class EngineServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            # stopping the engine first ends every open reply, so uvicorn has none to cancel
            await anyio.to_thread.run_sync(engine.stop)
            await super().shutdown(sockets)

    server = EngineServer(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    main = threading.current_thread() is threading.main_thread()
    # uvicorn re-raises the signal that stopped it once it has shut down; ignored here, the process then
    # exits normally (0)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        engine.stop()
        sock.close()
