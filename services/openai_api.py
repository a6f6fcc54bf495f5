"""The OpenAI-compatible HTTP API, served by the gateway beside its gRPC API.

DESIGN. One FastAPI app, run by uvicorn as a task in the gateway's own event loop
(``HttpServer``), so it shares the gateway's ``ServingCore``: the same engine socket,
tokenizer replicas, admission limit and metrics as the gRPC servicer. This module only
translates: an OpenAI body becomes ``GenerationRequest``s (``openai_protocol``), the
core's ``Delta``s become a JSON body or server-sent events, and a ``RequestError``'s
kind becomes an HTTP status in OpenAI's error shape:

    invalid 400 · unknown_model 404 · overloaded 429 (Retry-After) · unavailable 503
    (Retry-After) · internal 500 · no or wrong API key 401 · unknown route 404 · body
    too large 413 · headers over 16 KiB 431 · more connections than max_open_requests
    plus a headroom: uvicorn's bare 503

A stream's headers go out with its first token, not before, so a request the scheduler
refuses still gets its real status (429) rather than a 200 with an error inside. The
client going away, before or during the stream, cancels the work; ``Generation.close``
then aborts the sequences and their KV blocks are freed within one scheduler step.
``_Guard``, a plain ASGI middleware, checks the API key (``services.security``: constant
time; /health is open), caps the body size, and counts responses by route and status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from tessera.common.plan import TokenLogprobs
from tessera.proto.tessera.v1 import engine_pb2
from tessera.services.core import (
    Delta,
    ErrorKind,
    Generation,
    GenerationRequest,
    RequestError,
    ServingCore,
    TextPrompt,
    TokenPrompt,
)
from tessera.services.metrics import CONTENT_TYPE, Metrics
from tessera.services.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    TokenSpeller,
    chat_logprobs,
    completion_logprobs,
    error_body,
    usage_body,
)
from tessera.services.security import OPEN_HTTP_PATHS, BearerToken

logger = logging.getLogger(__name__)

T = TypeVar("T")
HEALTH_TIMEOUT = 2.0
MAX_HEADER_BYTES = 16 * 1024  # names and values of all of a request's headers
RETRY_AFTER_SECONDS = 1
_STATUS = {
    ErrorKind.INVALID: (400, "invalid_request_error", None),
    ErrorKind.UNKNOWN_MODEL: (404, "invalid_request_error", "model_not_found"),
    ErrorKind.OVERLOADED: (429, "rate_limit_error", "overloaded"),
    ErrorKind.UNAVAILABLE: (503, "server_error", "unavailable"),
    ErrorKind.INTERNAL: (500, "server_error", None),
}
_ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


class _ClientGone(Exception):
    """The client closed the connection before the response was ready."""


# -- errors ------------------------------------------------------------------------------


def error_response(
    status: int, message: str, type_: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status in (429, 503) else None
    return JSONResponse(error_body(message, type_, param, code), status, headers=headers)


def request_error_response(e: RequestError) -> JSONResponse:
    status, type_, code = _STATUS[e.kind]
    return error_response(status, e.message, type_, e.param, code)


def _validation_response(e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0] if e.errors() else {}
    loc = [p for p in first.get("loc", ()) if p != "body"]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    if first.get("type") == "extra_forbidden":
        message = f"unrecognized request argument supplied: {param}"
    elif first.get("type") == "json_invalid":
        message, param = "the body is not valid JSON", None
    elif param is None:
        message = "the body must be a JSON object with the request's fields"
    else:
        message = f"{param}: {first.get('msg', 'invalid value')}"
    return error_response(400, message, "invalid_request_error", param)


# -- the app ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Choice:
    """One choice of a response being collected."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    error: Delta | None = None


def create_app(core: ServingCore, metrics: Metrics, api_key: str | None, max_body_bytes: int
               ) -> FastAPI:
    app = FastAPI(title="Tessera", docs_url=None, redoc_url=None, openapi_url=None)
    api = _OpenAIFront(core, metrics)
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/metrics", api.prometheus, methods=["GET"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", api.model, methods=["GET"])
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"])

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError) -> JSONResponse:
        return request_error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return _validation_response(e)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> JSONResponse:
        if e.status_code == 404:
            message, code = f"no route {request.method} {request.url.path}", "unknown_url"
        else:
            message, code = str(e.detail), None
        return error_response(e.status_code, message, "invalid_request_error", None, code)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error; see the gateway's log", "server_error")

    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)
    app.state.front = api
    return app


class _OpenAIFront:
    def __init__(self, core: ServingCore, metrics: Metrics) -> None:
        self.core = core
        self.metrics = metrics
        self.speller = TokenSpeller(core.tokenizer)
        self.created = int(time.time())
        self.draining = False  # set on SIGTERM: /health says 503 so balancers move on

    # -- simple routes --------------------------------------------------------------------

    async def health(self) -> Response:
        if self.draining:
            return error_response(503, "shutting down", "server_error", code="draining")
        try:
            status = await self.core.status(timeout=HEALTH_TIMEOUT)
        except RequestError as e:
            return request_error_response(e)
        if not _engine_serving(status):
            return error_response(503, "the engine has no working executor", "server_error",
                                  code="unavailable")
        return JSONResponse({"status": "ok"})

    async def prometheus(self) -> Response:
        try:
            status = await self.core.status(timeout=HEALTH_TIMEOUT)
        except RequestError:
            status = None
        return Response(self.metrics.render(status), media_type=CONTENT_TYPE)

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.core.model,
            "object": "model",
            "created": self.created,
            "owned_by": "tessera",
            "max_model_len": self.core.info.max_model_len,
        }

    async def models(self) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, model: str) -> JSONResponse:
        if model != self.core.model:
            raise RequestError(
                ErrorKind.UNKNOWN_MODEL, f"the model {model!r} does not exist", "model"
            )
        return JSONResponse(self._model_card())

    # -- generation -----------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        rid = f"cmpl-{uuid.uuid4().hex}"
        requests = body.to_generation(rid)
        return await self._serve(request, _CompletionFormat(self, body, rid, requests), requests,
                                 bool(body.stream))

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        requests = body.to_generation(rid)
        return await self._serve(request, _ChatFormat(self, body, rid), requests,
                                 bool(body.stream))

    async def _serve(
        self, request: Request, fmt: _Format, requests: list[GenerationRequest], stream: bool
    ) -> Response:
        gens: list[Generation] = []

        def close_all() -> None:
            for g in gens:
                g.close()

        try:
            for r in requests:
                gens.append(await _or_disconnect(request, self.core.open(r)))
            deltas = _merge(gens)
            if not stream:
                try:
                    choices, usage = await _or_disconnect(request, _collect(deltas, fmt.n))
                finally:
                    close_all()
                return fmt.response(choices, usage)
            # The first delta decides the status: a refused request is a 429, not a 200.
            first = await _or_disconnect(request, anext(deltas, None))
        except _ClientGone:
            close_all()
            return Response(status_code=499)  # nobody reads it; nginx's "client closed"
        except BaseException:
            close_all()
            raise
        return _EventStream(fmt.events(first, deltas), close_all)


def _engine_serving(status: engine_pb2.StatusReply) -> bool:
    # Schedulers that report a state say when no executor works; older ones do not.
    unavailable = getattr(engine_pb2, "ENGINE_STATE_UNAVAILABLE", None)
    return unavailable is None or getattr(status, "state", None) != unavailable


class _EventStream(StreamingResponse):
    """Server-sent events whose generations are closed however the stream ends."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _or_disconnect(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, or _ClientGone (with ``work`` cancelled) if the client leaves."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise _ClientGone
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _merge(gens: list[Generation]) -> AsyncIterator[tuple[int, Delta]]:
    """(generation index, delta) of all generations, in arrival order."""
    if len(gens) == 1:
        async for delta in gens[0].deltas():
            yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen: Generation) -> None:
        try:
            async for delta in gen.deltas():
                queue.put_nowait((i, delta, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((i, None, e))
            return
        queue.put_nowait((i, None, None))

    tasks = [asyncio.get_running_loop().create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(gens)
        while left:
            i, delta, error = await queue.get()
            if error is not None:
                raise error
            if delta is None:
                left -= 1
                continue
            yield i, delta
    finally:
        for t in tasks:
            t.cancel()


async def _collect(
    deltas: AsyncIterator[tuple[int, Delta]], n: int
) -> tuple[dict[int, _Choice], tuple[int, int]]:
    choices: dict[int, _Choice] = {}
    prompt_tokens = completion_tokens = 0
    async for g, d in deltas:
        c = choices.setdefault(g * n + d.index, _Choice())
        c.text.append(d.text or "")
        c.logprobs.extend(d.logprobs)
        if d.finish_reason:
            c.finish_reason = d.finish_reason
            if d.finish_reason == "error":
                c.error = d
        if d.usage is not None:
            prompt_tokens += d.usage.prompt_tokens
            completion_tokens += d.usage.completion_tokens
    for c in choices.values():
        if c.error is not None:
            raise RequestError(c.error.error_kind or ErrorKind.INTERNAL, c.error.error)
    return dict(sorted(choices.items())), (prompt_tokens, completion_tokens)


# -- the two response formats --------------------------------------------------------------


async def _chain(
    first: tuple[int, Delta] | None, rest: AsyncIterator[tuple[int, Delta]]
) -> AsyncIterator[tuple[int, Delta]]:
    if first is not None:
        yield first
    async for item in rest:
        yield item


def _sse(body: dict[str, Any] | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body, separators=(',', ':'))}\n\n"


class _Format:
    """What differs between chat and completions: the bodies."""

    object_name = ""
    chunk_name = ""

    def __init__(self, front: _OpenAIFront, body: Any, rid: str) -> None:
        self.front = front
        self.rid = rid
        self.n = body.n or 1
        self.include_usage = body.include_usage
        self.created = int(time.time())

    def envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.rid, "object": obj, "created": self.created,
                "model": self.front.core.model, "system_fingerprint": None, "choices": choices}

    def response(self, choices: dict[int, _Choice], usage: tuple[int, int]) -> JSONResponse:
        body = self.envelope(self.object_name, [self.choice(i, c) for i, c in choices.items()])
        body["usage"] = usage_body(*usage)
        return JSONResponse(body)

    def chunk(self, choices: list[dict[str, Any]]) -> str:
        body = self.envelope(self.chunk_name, choices)
        if self.include_usage:
            body["usage"] = None
        return _sse(body)

    async def events(
        self, first: tuple[int, Delta] | None, deltas: AsyncIterator[tuple[int, Delta]]
    ) -> AsyncIterator[str]:
        prompt_tokens = completion_tokens = 0
        for chunk in self.opening():
            yield chunk
        try:
            async for g, d in _chain(first, deltas):
                if d.finish_reason == "error":
                    raise RequestError(d.error_kind or ErrorKind.INTERNAL, d.error)
                for chunk in self.delta_chunks(g * self.n + d.index, d):
                    yield chunk
                if d.usage is not None:
                    prompt_tokens += d.usage.prompt_tokens
                    completion_tokens += d.usage.completion_tokens
        except RequestError as e:  # the status is sent already: the error is an event
            _, type_, code = _STATUS[e.kind]
            yield _sse(error_body(e.message, type_, e.param, code))
        else:
            if self.include_usage:
                body = self.envelope(self.chunk_name, [])
                body["usage"] = usage_body(prompt_tokens, completion_tokens)
                yield _sse(body)
        yield _sse("[DONE]")

    def opening(self) -> list[str]:
        return []

    def choice(self, index: int, c: _Choice) -> dict[str, Any]:
        raise NotImplementedError

    def delta_chunks(self, index: int, d: Delta) -> list[str]:
        raise NotImplementedError


class _ChatFormat(_Format):
    object_name = "chat.completion"
    chunk_name = "chat.completion.chunk"

    def __init__(self, front: _OpenAIFront, body: ChatCompletionRequest, rid: str) -> None:
        super().__init__(front, body, rid)
        self.logprobs = bool(body.logprobs)

    def _logprobs(self, lps: list[TokenLogprobs]) -> dict[str, Any] | None:
        return {"content": chat_logprobs(lps, self.front.speller)} if self.logprobs else None

    def choice(self, index: int, c: _Choice) -> dict[str, Any]:
        return {
            "index": index,
            "message": {"role": "assistant", "content": "".join(c.text)},
            "logprobs": self._logprobs(c.logprobs),
            "finish_reason": c.finish_reason,
        }

    def opening(self) -> list[str]:
        return [
            self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None}])
            for i in range(self.n)
        ]

    def delta_chunks(self, index: int, d: Delta) -> list[str]:
        out = []
        if d.text or d.logprobs:
            out.append(self.chunk([{"index": index, "delta": {"content": d.text or ""},
                                    "logprobs": self._logprobs(d.logprobs),
                                    "finish_reason": None}]))
        if d.finish_reason:
            out.append(self.chunk([{"index": index, "delta": {}, "logprobs": None,
                                    "finish_reason": d.finish_reason}]))
        return out


class _CompletionFormat(_Format):
    object_name = "text_completion"
    chunk_name = "text_completion"

    def __init__(self, front: _OpenAIFront, body: CompletionRequest, rid: str,
                 requests: list[GenerationRequest]) -> None:
        super().__init__(front, body, rid)
        self.logprobs = body.logprobs is not None
        self.echo = [self._prompt_text(r) for r in requests] if body.echo else None
        self.offsets: dict[int, int] = {}  # choice -> text offset of its next token

    def _prompt_text(self, r: GenerationRequest) -> str:
        if isinstance(r.prompt, TextPrompt):
            return r.prompt.text
        tokenizer = self.front.core.tokenizer
        if isinstance(r.prompt, TokenPrompt) and tokenizer is not None:
            return tokenizer.decode(list(r.prompt.token_ids))
        return ""

    def _echo(self, index: int) -> str:
        return self.echo[index // self.n] if self.echo is not None else ""

    def _logprobs(self, index: int, lps: list[TokenLogprobs]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        body, self.offsets[index] = completion_logprobs(
            lps, self.front.speller, self.offsets.get(index, len(self._echo(index)))
        )
        return body

    def choice(self, index: int, c: _Choice) -> dict[str, Any]:
        return {
            "index": index,
            "text": self._echo(index) + "".join(c.text),
            "logprobs": self._logprobs(index, c.logprobs),
            "finish_reason": c.finish_reason,
        }

    def opening(self) -> list[str]:
        if self.echo is None:
            return []
        return [
            self.chunk([{"index": i, "text": self._echo(i), "logprobs": None,
                         "finish_reason": None}])
            for i in range(len(self.echo) * self.n)
        ]

    def delta_chunks(self, index: int, d: Delta) -> list[str]:
        if not (d.text or d.logprobs or d.finish_reason):
            return []
        return [self.chunk([{"index": index, "text": d.text or "",
                             "logprobs": self._logprobs(index, d.logprobs),
                             "finish_reason": d.finish_reason}])]


# -- the ASGI guard -------------------------------------------------------------------------


class _Guard:
    """API key, body size cap and response counting, before FastAPI sees the request."""

    def __init__(self, app: Callable, api_key: str | None, max_body_bytes: int,
                 metrics: Metrics) -> None:
        self.app = app
        self.token = BearerToken(api_key) if api_key else None
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status = 500

        async def counted_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            header_bytes = sum(len(k) + len(v) for k, v in scope["headers"])
            if header_bytes > MAX_HEADER_BYTES:  # h11 bounds only headers that come slowly
                response = error_response(
                    431, f"the headers are over {MAX_HEADER_BYTES} bytes",
                    "invalid_request_error", None, "headers_too_large",
                )
                await response(scope, receive, counted_send)
                return
            if path not in OPEN_HTTP_PATHS and not self._authorized(scope):
                response = error_response(
                    401, "missing or incorrect API key; send Authorization: Bearer <key>",
                    "invalid_request_error", None, "invalid_api_key",
                )
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, counted_send)
                return
            body = await self._read_body(receive)
            if body is None:
                status = 499
                return
            if len(body) > self.max_body_bytes:
                response = error_response(
                    413, f"the body is over {self.max_body_bytes} bytes",
                    "invalid_request_error", None, "request_too_large",
                )
                await response(scope, receive, counted_send)
                return
            await self.app(scope, _replay(body, receive), counted_send)
        finally:
            self.metrics.http_response(_route_label(path), status)

    def _authorized(self, scope: dict) -> bool:
        if self.token is None:
            return True
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
        return self.token.matches(given)  # constant time (services.security)

    async def _read_body(self, receive: Callable) -> bytes | None:
        """The whole body, or as much as tells it is too large; None if the client left."""
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes or not message.get("more_body", False):
                return bytes(body)


def _replay(body: bytes, receive: Callable) -> Callable:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then the real stream: http.disconnect when the client leaves

    return replay


def _route_label(path: str) -> str:
    if path in _ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "unknown"


# -- the server -----------------------------------------------------------------------------


class _Server(uvicorn.Server):
    def capture_signals(self):  # noqa: ANN201 - the gateway owns SIGTERM/SIGINT, not uvicorn
        return nullcontext()


class HttpServer:
    """uvicorn serving ``app`` as a task of the running event loop."""

    def __init__(self, app: FastAPI, host: str, port: int, grace_seconds: float,
                 tls: dict[str, Any] | None = None, limit_concurrency: int | None = None
                 ) -> None:
        """``tls``: uvicorn's ssl_* arguments (services.security.TlsFiles).
        ``limit_concurrency``: connections and requests at once; past it uvicorn answers
        503 at once (a bound on idle connections too: the core's 429 counts requests)."""
        self.app = app
        self.host = host
        self.port = port
        config = uvicorn.Config(
            app,
            log_config=None,  # the gateway's logging setup stands
            access_log=False,
            lifespan="off",
            ws="none",
            server_header=False,
            timeout_graceful_shutdown=grace_seconds,
            limit_concurrency=limit_concurrency,
            # Request line and headers: at most 16 KiB (h11), else 400.
            h11_max_incomplete_event_size=16 * 1024,
            **(tls or {}),
        )
        self._server = _Server(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Bind (OSError if the port is taken) and serve."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    def begin_drain(self) -> None:
        self.app.state.front.draining = True

    async def stop(self) -> None:
        """Stop taking connections; in-flight responses get the grace period to finish."""
        self._server.should_exit = True
        if self._task is not None:
            await self._task
