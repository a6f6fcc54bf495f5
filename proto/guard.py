"""Strict decoding at every gRPC server (the gateway, the tokenizer replicas).

grpc parses a request with the method's protobuf class before any servicer code runs;
bytes that do not parse (a pickle, garbage, a truncated message) make it answer UNKNOWN
and log a traceback, as if the server had a bug. ``DecodeGuard``, a server interceptor,
parses them instead: what does not parse is logged in one line and answered
INVALID_ARGUMENT, the client's fault. Nothing is ever unpickled: protobuf is the only
decoder on any socket.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

logger = logging.getLogger(__name__)


class _Undecodable:
    """What a request that did not parse becomes, for the guarded method to refuse."""

    __slots__ = ("size", "why")

    def __init__(self, size: int, why: str) -> None:
        self.size = size
        self.why = why


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Undecodable requests of unary-request methods are INVALID_ARGUMENT, not UNKNOWN.

    Put it last among a server's interceptors, next to the servicer: the ones before it
    (an API key check) may swap the method's behaviour, never its parsing.
    """

    async def intercept_service(self, continuation: Callable, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        method = details.method

        def deserialize(data: bytes) -> Any:
            try:
                return parse(data)
            except DecodeError as e:
                return _Undecodable(len(data), str(e))

        async def refuse(request: _Undecodable, context: grpc.aio.ServicerContext) -> None:
            logger.warning(
                "rejected an undecodable request to %s (%d bytes) from %s: %s",
                method, request.size, context.peer(), request.why,
            )  # fmt: skip
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request is not a valid message: {request.why}",
            )

        if handler.response_streaming:
            behavior = handler.unary_stream
            if not inspect.isasyncgenfunction(behavior):
                return handler  # grpc's own handling: this guard wraps async servicers

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext
                                   ) -> AsyncIterator[Any]:
                if isinstance(request, _Undecodable):
                    await refuse(request, context)
                async for response in behavior(request, context):
                    yield response

            return handler._replace(request_deserializer=deserialize, unary_stream=unary_stream)
        behavior = handler.unary_unary
        if not inspect.iscoroutinefunction(behavior):
            return handler

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                await refuse(request, context)
            return await behavior(request, context)

        return handler._replace(request_deserializer=deserialize, unary_unary=unary_unary)
