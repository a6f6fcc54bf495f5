"""The HTTP edge of the OpenAI API: what stands before FastAPI, and the server that runs it.

Owns the limits a request meets before any route sees it and the counting of every
response: ``Guard``, a plain ASGI middleware, answers 431 for headers over
``MAX_HEADER_BYTES``, 401 for a missing or wrong API key (``services.security``: constant
time; /health is open) and 413 for a body over the cap, and counts responses by route and
status. ``HttpServer`` runs uvicorn as a task of the gateway's event loop, with its own
limits: the connection cap (``limit_concurrency``, past which uvicorn answers a bare 503),
h11's bound on the request line and headers, and the grace period of a shutdown.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import uvicorn
from fastapi import FastAPI

from tessera.common.request_fields import invalid_text
from tessera.services.metrics import Metrics
from tessera.services.openai_errors import error_response
from tessera.services.security import OPEN_HTTP_PATHS, BearerToken

MAX_HEADER_BYTES = 16 * 1024  # names and values of all of a request's headers
_ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
           "/tokenize", "/detokenize", "/version", "/docs", "/openapi.json")


# -- the ASGI guard -------------------------------------------------------------------------


class Guard:
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
            bad = _invalid_text(body)
            if bad is not None:  # refused here, once, for every route and field
                response = error_response(
                    400, f"{bad} is not valid Unicode (it holds an unpaired surrogate)",
                    "invalid_request_error", bad, "invalid_unicode",
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


# A JSON escape of a UTF-16 surrogate (\uD800-\uDFFF): paired it is an astral
# character, unpaired it decodes to a str that no UTF-8 encoder takes.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _invalid_text(body: bytes) -> str | None:
    """Where a JSON body holds text that is not valid Unicode (common.request_fields),
    or None. Only a body that could hold such text is decoded here: one with a surrogate
    escape, or one that is not UTF-8 (json.loads passes surrogate bytes through, and
    reads UTF-16 and UTF-32 bodies); a body that is not JSON is left to the route."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        if _SURROGATE_ESCAPE.search(body) is None:
            return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return invalid_text(value)


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
                 tls: dict[str, Any] | None = None, limit_concurrency: int | None = None,
                 reuse_port: bool = False) -> None:
        """``tls``: uvicorn's ssl_* arguments (services.security.TlsFiles).
        ``reuse_port``: share the port with the other gateways (SO_REUSEPORT).
        ``limit_concurrency``: connections and requests at once; past it uvicorn answers
        503 at once (a bound on idle connections too: the core's 429 counts requests)."""
        self.app = app
        self.host = host
        self.port = port
        self.reuse_port = reuse_port
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
        sock = socket.create_server((self.host, self.port), family=family,
                                    reuse_port=self.reuse_port)
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
