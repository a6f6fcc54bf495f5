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
``Guard`` (``openai_server``), a plain ASGI middleware, checks the API key
(``services.security``: constant time; /health is open), caps the body size, and counts
responses by route and status.

This module owns the app and its routes (``create_app``) and how a request is served:
opening its generations, merging their deltas, and dropping the work when the client
leaves. Beside it: ``openai_errors`` (error shapes, status mapping, exception handlers),
``openai_responses`` (JSON and SSE bodies), ``openai_server`` (the guard and
``HttpServer``, re-exported here for the gateway).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tessera.proto.tessera.v1 import engine_pb2
from tessera.services.core import (
    Delta,
    ErrorKind,
    Generation,
    GenerationRequest,
    RequestError,
    ServingCore,
)
from tessera.services.embeddings import add_embeddings_route
from tessera.services.http_disconnect import ClientGone, or_disconnect
from tessera.services.metrics import CONTENT_TYPE, Metrics
from tessera.services.openai_errors import (
    error_response,
    install_error_handlers,
    request_error_response,
)
from tessera.services.openai_extras import add_extra_routes, tessera_version
from tessera.services.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    TokenSpeller,
)
from tessera.services.openai_responses import (
    ChatFormat,
    Choice,
    CompletionFormat,
    EventStream,
    Format,
)
from tessera.services.openai_server import Guard, HttpServer

__all__ = ["HttpServer", "create_app"]

HEALTH_TIMEOUT = 2.0


# -- the app ------------------------------------------------------------------------------


def create_app(core: ServingCore, metrics: Metrics, api_key: str | None, max_body_bytes: int
               ) -> FastAPI:
    # The OpenAPI page at /docs (schema at /openapi.json), behind the API key like the rest.
    app = FastAPI(title="Tessera", version=tessera_version(), docs_url="/docs", redoc_url=None,
                  openapi_url="/openapi.json")
    api = OpenAIFront(core, metrics)
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/metrics", api.prometheus, methods=["GET"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", api.model, methods=["GET"])
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"])
    add_embeddings_route(app, core)  # /v1/embeddings (services/embeddings.py)
    # vLLM's admin route (behind the API key like every route but /health and /metrics)
    app.add_api_route("/reset_prefix_cache", api.reset_prefix_cache, methods=["POST"])
    add_extra_routes(app, core)  # /tokenize, /detokenize, /version
    install_error_handlers(app)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)
    app.state.front = api
    return app


class OpenAIFront:
    """The routes, over the gateway's ``ServingCore``; ``HttpServer.begin_drain`` sets
    ``draining``."""

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

    async def reset_prefix_cache(self) -> Response:
        try:
            num_dropped = await self.core.reset_prefix_cache()
        except RequestError as e:
            return request_error_response(e)
        return JSONResponse({"num_blocks_dropped": num_dropped})

    def _model_card(self, name: str) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "tessera",
            "max_model_len": self.core.info.max_model_len,
        }

    async def models(self) -> JSONResponse:
        cards = [self._model_card(name) for name in self.core.served_names]
        return JSONResponse({"object": "list", "data": cards})

    async def model(self, model: str) -> JSONResponse:
        if model not in self.core.served_names:
            raise RequestError(
                ErrorKind.UNKNOWN_MODEL, f"the model {model!r} does not exist", "model"
            )
        return JSONResponse(self._model_card(model))

    # -- generation -----------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        rid = f"cmpl-{uuid.uuid4().hex}"
        requests = body.to_generation(rid, self.core.sampling_defaults)
        return await self._serve(request, CompletionFormat(self, body, rid, requests), requests,
                                 bool(body.stream))

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        requests = body.to_generation(rid, self.core.sampling_defaults)
        return await self._serve(request, ChatFormat(self, body, rid), requests,
                                 bool(body.stream))

    async def _serve(
        self, request: Request, fmt: Format, requests: list[GenerationRequest], stream: bool
    ) -> Response:
        gens: list[Generation] = []

        def close_all() -> None:
            for g in gens:
                g.close()

        try:
            for r in requests:
                gens.append(await or_disconnect(request, self.core.open(r)))
            deltas = _merge(gens)
            if not stream:
                try:
                    choices, usage = await or_disconnect(request, _collect(deltas, fmt.n))
                finally:
                    close_all()
                return fmt.response(choices, usage)
            # The first delta decides the status: a refused request is a 429, not a 200.
            first = await or_disconnect(request, anext(deltas, None))
        except ClientGone:
            close_all()
            return Response(status_code=499)  # nobody reads it; nginx's "client closed"
        except BaseException:
            close_all()
            raise
        return EventStream(fmt.events(first, deltas), close_all)


def _engine_serving(status: engine_pb2.StatusReply) -> bool:
    # Schedulers that report a state say when no executor works; older ones do not.
    unavailable = getattr(engine_pb2, "ENGINE_STATE_UNAVAILABLE", None)
    return unavailable is None or getattr(status, "state", None) != unavailable


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
) -> tuple[dict[int, Choice], tuple[int, int, int]]:
    choices: dict[int, Choice] = {}
    prompt_tokens = completion_tokens = cached_tokens = 0
    async for g, d in deltas:
        c = choices.setdefault(g * n + d.index, Choice())
        c.text.append(d.text or "")
        c.logprobs.extend(d.logprobs)
        if d.finish_reason:
            c.finish_reason = d.finish_reason
            if d.finish_reason == "error":
                c.error = d
        if d.usage is not None:
            prompt_tokens += d.usage.prompt_tokens
            completion_tokens += d.usage.completion_tokens
            cached_tokens += d.usage.cached_tokens
    for c in choices.values():
        if c.error is not None:
            raise RequestError(c.error.error_kind or ErrorKind.INTERNAL, c.error.error)
    return dict(sorted(choices.items())), (prompt_tokens, completion_tokens, cached_tokens)
