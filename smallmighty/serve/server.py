"""`slm serve`: an OpenAI-compatible HTTP server for causal LMs and classifiers, on FastAPI + uvicorn.

Causal LMs get `/v1/chat/completions` and `/v1/completions` (streamed as server-sent events or
not) and `/v1/models`, decoded with continuous batching (`serve.scheduler`), and a chat page at
`/`. Classifiers made by `slm distill` get `/v1/classify`, micro-batched (`serve.classify`). Both
get `/health` and `/metrics` (Prometheus text).

Safe by default: the CLI binds 127.0.0.1; with an API key every /v1 and /metrics request needs
`Authorization: Bearer <key>`; request bodies are capped; every client mistake is a 4xx with an
OpenAI-style `{"error": {...}}` object, never a traceback; a full queue answers 429 with
`Retry-After`; a client that goes away frees its slot at once; SIGTERM lets in-flight requests
finish within a deadline (uvicorn's graceful shutdown), then stops the model threads.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from smallmighty.errors import SlmError
from smallmighty.serve.classify import ClassifyBatcher
from smallmighty.serve.monitoring import Metrics
from smallmighty.serve.openai_schema import (
    ApiError,
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    parse,
)
from smallmighty.serve.scheduler import Delta, Failure, Finish, QueueFull, Scheduler, Sequence, on_own_thread

log = logging.getLogger("smallmighty.serve")

#: Paths reported by name in the request counter; anything else counts as "other" (so a fuzzer
#: or a scanner cannot grow the metric without bound).
ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions",
             "/v1/classify")
#: How often a non-streaming request checks that its client is still there.
DISCONNECT_POLL_S = 0.2


@dataclass
class ServeConfig:
    """What the HTTP layer enforces; the CLI fills it from its flags."""

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    drain_seconds: float = 30.0


class ChatService:
    """A causal LM behind the scheduler: turns API requests into token sequences and back."""

    kind = "chat"

    def __init__(self, engine: Any, scheduler: Scheduler) -> None:
        self.engine, self.scheduler = engine, scheduler

    def prepare(self, body: ChatCompletionRequest | CompletionRequest) -> tuple[list[int], Any]:
        """Prompt ids and generation settings for `body`; ApiError 400 when they do not fit."""
        engine = self.engine
        try:
            if isinstance(body, ChatCompletionRequest):
                text = engine.apply_chat_template(body.chat(), add_generation_prompt=True)
            else:
                text = body.text()
            ids = engine.encode(text)
        except SlmError as err:
            raise ApiError(400, str(err)) from None
        limit = engine.max_seq_len
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if len(ids) >= limit:
            raise ApiError(400, f"this model's maximum context length is {limit} tokens, and the "
                                f"prompt alone has {len(ids)}; shorten it (at least one token must "
                                "be left for the reply)", code="context_length_exceeded")
        wanted = body.token_limit()
        if wanted is not None and len(ids) + wanted > limit:
            raise ApiError(400, f"this model's maximum context length is {limit} tokens, but "
                                f"{len(ids) + wanted} were requested ({len(ids)} in the prompt, "
                                f"{wanted} for the reply); lower max_tokens or shorten the prompt",
                           param="max_tokens", code="context_length_exceeded")
        settings = body.settings(wanted if wanted is not None else limit - len(ids))
        try:
            settings.validate()
        except SlmError as err:
            raise ApiError(400, str(err)) from None
        return ids, settings

    def close(self) -> None:
        self.scheduler.stop()


class ClassifyService:
    """A classifier behind the micro-batcher."""

    kind = "classifier"

    def __init__(self, batcher: ClassifyBatcher) -> None:
        self.batcher = batcher

    def close(self) -> None:
        self.batcher.stop()


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class Guard:
    """ASGI middleware in front of every route: API key, body size cap, and requests by status.

    The body is read here, up to the cap, before the app sees it: an over-long body is refused
    with 413 without buffering more than `max_body_bytes`.
    """

    def __init__(self, app: Callable, config: ServeConfig, metrics: Metrics) -> None:
        self.app, self.config, self.metrics = app, config, metrics
        self.key = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        status = 500

        async def counted_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            error = self._check_key(scope, path)
            body = b""
            if error is None:
                body, error = await self._read_body(scope, receive)
            if error is not None:
                await error_response(error)(scope, receive, counted_send)
                return
            await self.app(scope, _replay(body, receive), counted_send)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()

    def _check_key(self, scope: dict, path: str) -> ApiError | None:
        if self.key is None or not (path.startswith("/v1/") or path == "/metrics"):
            return None
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return None
        message = ("missing API key: send the header 'Authorization: Bearer <key>'" if not given
                   else "invalid API key")
        return ApiError(401, message, code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(self, scope: dict, receive: Callable) -> tuple[bytes, ApiError | None]:
        limit = self.config.max_body_bytes
        too_big = ApiError(413, f"request body larger than {limit} bytes", code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return b"", ApiError(400, "invalid Content-Length header")
            if int(declared) > limit:
                return b"", too_big
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", too_big
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks), None


def _replay(body: bytes, receive: Callable) -> Callable[[], Awaitable[dict]]:
    """A `receive` that gives the already-read body once, then waits for the client's disconnect."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({err})") from None


def create_app(service: ChatService | ClassifyService, config: ServeConfig) -> FastAPI:
    """The ASGI app for `service`; closing the app (lifespan end) stops the service's thread."""
    metrics = Metrics()
    if isinstance(service, ChatService):
        metrics.watch(service.scheduler.queue_depth, service.scheduler.active)
    else:
        metrics.watch(service.batcher.queue_depth, lambda: 0)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    app = FastAPI(title="smallmighty", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.metrics, app.state.service = metrics, service
    app.add_middleware(Guard, config=config, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}",
                                       type=kind))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(ApiError(500, "internal server error", type="server_error"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": config.model_name, "kind": service.kind}

    @app.get("/metrics")
    async def metrics_text() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "smallmighty", "kind": service.kind}]}

    if isinstance(service, ChatService):
        _chat_routes(app, service, config, metrics)
    else:
        _classify_routes(app, service, config, metrics)
    return app


def _chat_routes(app: FastAPI, service: ChatService, config: ServeConfig, metrics: Metrics) -> None:
    page = files("smallmighty.serve").joinpath("static/chat.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page.replace("{{MODEL}}", config.model_name))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse(ChatCompletionRequest, await _json_body(request))
        return await _generate(request, body, service, config, metrics, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse(CompletionRequest, await _json_body(request))
        return await _generate(request, body, service, config, metrics, chat=False)


class _Outbox:
    """Hands events from the scheduler thread to the request coroutines on the event loop.

    Why: a decode step of 16 sequences makes 16 events at once. Waking the loop once for all of
    them (one `call_soon_threadsafe`, one pipe write, one pass of the loop) instead of once per
    event leaves more of the CPU, which the HTTP side shares with the model, to the model.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[tuple[asyncio.Queue, Any]] = []
        self._lock = threading.Lock()

    def put(self, queue: asyncio.Queue, event: Any) -> None:
        """Called on the scheduler thread: `event` goes into `queue` at the loop's next hand-over."""
        with self._lock:
            self._items.append((queue, event))
            if len(self._items) > 1:
                return  # a hand-over is already scheduled
        try:
            self.loop.call_soon_threadsafe(self._hand_over)
        except RuntimeError:  # the event loop has closed (shutdown): nobody is listening
            pass

    def _hand_over(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, event in items:
            queue.put_nowait(event)

    @staticmethod
    def of(app: FastAPI) -> "_Outbox":
        """The app's outbox for the running event loop."""
        loop = asyncio.get_running_loop()
        if getattr(app.state, "outbox", None) is None or app.state.outbox.loop is not loop:
            app.state.outbox = _Outbox(loop)
        return app.state.outbox


class _Run:
    """One generation request on the HTTP side: its sequence, its event queue, its timings."""

    def __init__(self, service: ChatService, metrics: Metrics, endpoint: str, outbox: _Outbox) -> None:
        self.service, self.metrics, self.endpoint = service, metrics, endpoint
        self.arrived = time.perf_counter()
        self.first_token = False
        self.finished = False
        self.events: asyncio.Queue = asyncio.Queue()
        self.outbox = outbox
        self.seq: Sequence | None = None

    def emit(self, event: Any) -> None:
        """Called on the scheduler thread: hand `event` to this request's coroutine."""
        self.outbox.put(self.events, event)

    async def next(self) -> Any:
        return self._observe(await self.events.get())

    async def next_events(self) -> list[Any]:
        """The next event and every one queued behind it (a client reading slower than tokens
        come gets them in one piece)."""
        events = [await self.next()]
        while not self.events.empty() and not isinstance(events[-1], (Finish, Failure)):
            events.append(self._observe(self.events.get_nowait()))
        return events

    def _observe(self, event: Any) -> Any:
        if not self.first_token and isinstance(event, (Delta, Finish)):
            self.first_token = True
            self.metrics.ttft.observe(time.perf_counter() - self.arrived)
        if isinstance(event, (Finish, Failure)):
            self.finished = True
            self.metrics.latency.labels(self.endpoint).observe(time.perf_counter() - self.arrived)
            if isinstance(event, Finish):
                self.metrics.prompt_tokens.inc(event.prompt_tokens)
                self.metrics.cached_prompt_tokens.inc(event.cached_tokens)
                self.metrics.completion_tokens.inc(event.completion_tokens)
        return event

    def abandon(self) -> None:
        """The client went away: free the slot and count what was spent."""
        if self.seq is not None and not self.finished:
            self.service.scheduler.cancel(self.seq)
            self.metrics.cancelled.inc()
            self.metrics.prompt_tokens.inc(self.seq.prefilled)
            self.metrics.completion_tokens.inc(self.seq.generated)


async def _generate(request: Request, body: Any, service: ChatService, config: ServeConfig,
                    metrics: Metrics, *, chat: bool) -> Response:
    run = _Run(service, metrics, request.url.path, _Outbox.of(request.app))
    ids, settings = await run_in_threadpool(service.prepare, body)
    run.seq = Sequence(ids, settings, run.emit, ignore_eos=body.ignore_eos)
    try:
        service.scheduler.submit(run.seq)
    except QueueFull as full:
        raise ApiError(429, str(full), type="rate_limit_error", code="server_busy",
                       headers={"Retry-After": str(full.retry_after)}) from None
    ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
    created = int(time.time())
    shape = _ChunkShape(ident, created, config.model_name, chat)
    if body.stream:
        return StreamingResponse(_stream(run, shape, body.include_usage()), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    parts: list[str] = []
    try:
        while True:
            event = await _next_unless_gone(run, request)
            if event is None:
                return Response(status_code=499)  # nobody reads it; the code shows in /metrics
            if isinstance(event, Delta):
                parts.append(event.text)
            elif isinstance(event, Failure):
                raise ApiError(500, event.message, type="server_error")
            else:
                return JSONResponse(shape.whole("".join(parts), event))
    finally:
        run.abandon()


async def _next_unless_gone(run: _Run, request: Request) -> Any:
    """The next event, or None once the client has disconnected (checked every few tenths of a second)."""
    waiting = asyncio.ensure_future(run.next())
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
        if done:
            return waiting.result()
        if await request.is_disconnected():
            waiting.cancel()
            return None


async def _stream(run: _Run, shape: "_ChunkShape", include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's format; ends with `data: [DONE]`."""
    try:
        if shape.chat:
            yield shape.sse(shape.chunk({"role": "assistant", "content": ""}, None))
        while True:
            events = await run.next_events()
            text = "".join(e.text for e in events if isinstance(e, Delta))
            if text:
                yield shape.sse(shape.chunk(shape.delta(text), None))
            event = events[-1]
            if isinstance(event, Delta):
                continue
            if isinstance(event, Failure):
                yield shape.sse(ApiError(500, event.message, type="server_error").body())
                return
            yield shape.sse(shape.chunk({} if shape.chat else "", event.reason))
            if include_usage:
                yield shape.sse({**shape.chunk({}, None), "choices": [], "usage": _usage(event)})
            yield "data: [DONE]\n\n"
            return
    finally:
        run.abandon()


def _usage(event: Finish) -> dict[str, Any]:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": event.cached_tokens}}


@dataclass
class _ChunkShape:
    """The JSON shapes of OpenAI's chat and text completion objects for one request."""

    ident: str
    created: int
    model: str
    chat: bool

    def delta(self, text: str) -> Any:
        return {"content": text} if self.chat else text

    def chunk(self, delta: Any, reason: str | None) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": reason}
            kind = "text_completion"
        return {"id": self.ident, "object": kind, "created": self.created, "model": self.model,
                "choices": [choice]}

    def whole(self, text: str, event: Finish) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": event.reason}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": event.reason}
            kind = "text_completion"
        return {"id": self.ident, "object": kind, "created": self.created, "model": self.model,
                "choices": [choice], "usage": _usage(event)}

    @staticmethod
    def sse(data: dict) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _classify_routes(app: FastAPI, service: ClassifyService, config: ServeConfig,
                     metrics: Metrics) -> None:
    @app.post("/v1/classify")
    async def classify(request: Request) -> dict:
        arrived = time.perf_counter()
        body = parse(ClassifyRequest, await _json_body(request))
        texts = body.texts()
        results = await asyncio.wrap_future(service.batcher.submit(texts))
        metrics.classified_texts.inc(len(texts))
        metrics.latency.labels("/v1/classify").observe(time.perf_counter() - arrived)
        return {"object": "list", "model": config.model_name,
                "data": [{"index": i, **result} for i, result in enumerate(results)]}


#: Context length `slm serve` gives each sequence unless told otherwise: the KV cache holds
#: max_batch x context positions (SmolLM2-135M: 46 KB each, so 16 x 2048 is 1.5 GB at most).
DEFAULT_SERVE_CONTEXT = 2048


def is_classifier(model: str | None) -> bool:
    """Whether `model` is a folder holding a sequence classifier (as `slm distill` saves one)."""
    from pathlib import Path

    config = Path(model) / "config.json" if model else None
    if config is None or not config.is_file():
        return False
    try:
        architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (ValueError, AttributeError):
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in architectures)


def load_service(model: str | None = None, *, precision: str = "int8", max_seq_len: int | None = None,
                 max_batch: int = 16, max_queue: int = 64, prefill_chunk: int = 256, prefill_budget: int = 32,
                 prefix_cache_tokens: int = 2048, runtime: str = "onnx") -> ChatService | ClassifyService:
    """Load `model` (a classifier folder, or any causal LM `slm generate` runs; None = the default
    SmolLM2) and start its scheduler or batcher thread."""
    for name, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0),
                             ("prefill_chunk", prefill_chunk, 1), ("prefill_budget", prefill_budget, 1),
                             ("prefix_cache_tokens", prefix_cache_tokens, 0)):
        if not isinstance(value, int) or value < low:
            raise SlmError(f"{name} must be an integer >= {low}, got {value!r}")
    if is_classifier(model):
        from smallmighty.engine.classifier import load_classifier

        return ClassifyService(ClassifyBatcher(load_classifier(model, runtime=runtime)))
    from smallmighty.engine.generate import Engine
    from smallmighty.engine.model import LlamaConfig
    from smallmighty.models.causal_lm import resolve_causal_lm

    folder = resolve_causal_lm(model)
    if max_seq_len is None:
        max_seq_len = min(LlamaConfig.from_file(folder / "config.json").context_limit, DEFAULT_SERVE_CONTEXT)
    engine = on_own_thread(lambda: Engine.from_pretrained(folder, precision=precision, max_seq_len=max_seq_len))
    return ChatService(engine, Scheduler(engine, max_batch=max_batch, max_queue=max_queue,
                                         prefill_chunk=prefill_chunk, prefill_budget=prefill_budget,
                                         prefix_cache_tokens=prefix_cache_tokens))


def run_server(service: ChatService | ClassifyService, config: ServeConfig, *, host: str = "127.0.0.1",
               port: int = 8000, log_level: str = "warning") -> None:
    """Serve `service` until SIGTERM or Ctrl-C; in-flight requests get `config.drain_seconds` to finish."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(
        create_app(service, config), host=host, port=port, log_level=log_level, access_log=False,
        timeout_graceful_shutdown=config.drain_seconds, lifespan="on")).run()
