"""Strict decoding at every gRPC server (the gateway, the tokenizer replicas).

grpc parses a request with the method's protobuf class before any servicer code runs;
bytes that do not parse (a pickle, garbage, a truncated message, a string field that is
not valid UTF-8) make it answer UNKNOWN and log a traceback, as if the server had a bug.
``DecodeGuard``, a server interceptor, parses them instead: what does not parse is
logged in one line and answered INVALID_ARGUMENT, the client's fault, naming the string
field when that is what is wrong. Nothing is ever unpickled: protobuf is the only
decoder on any socket.

It covers every method of every service the server holds, grpcio's own health and
reflection services included, in each of grpc.aio's shapes: a unary request is checked
before the handler runs; a streaming request is checked message by message as the
handler reads it (through the request iterator or ``context.read()``), and the first
undecodable one ends the call. Handlers may be coroutines, async generators or plain
(sync) functions and generators, which grpc runs in its thread pool; each wrapper keeps
the kind of the handler it wraps, since grpc picks how to run a handler by its kind.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

logger = logging.getLogger(__name__)

_INVALID = grpc.StatusCode.INVALID_ARGUMENT


class _Undecodable:
    """What a request that did not parse becomes, for the guarded method to refuse."""

    __slots__ = ("method", "size", "why")

    def __init__(self, method: str, size: int, why: str) -> None:
        self.method = method
        self.size = size
        self.why = why

    def log(self, peer: str) -> str:
        """Log the refusal in one line; the status details for the client."""
        logger.warning(
            "rejected an undecodable request to %s (%d bytes) from %s: %s",
            self.method, self.size, peer, self.why,
        )  # fmt: skip
        return f"the request is not a valid message: {self.why}"


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Undecodable requests of every method are INVALID_ARGUMENT, not UNKNOWN.

    Put it last among a server's interceptors, next to the servicer: the ones before it
    (an API key check) may swap the method's behaviour, never its parsing.
    """

    async def intercept_service(self, continuation: Callable, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler  # bytes in, bytes out: nothing to parse
        return guard_handler(handler, details.method)


def guard_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """``handler`` with a deserializer that never raises and a behaviour that refuses
    what did not parse."""
    parse = handler.request_deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as e:
            return _Undecodable(method, len(data), _explain(parse, data, e))

    kind = ("stream" if handler.request_streaming else "unary") + (
        "_stream" if handler.response_streaming else "_unary"
    )
    behavior = getattr(handler, kind)
    if handler.request_streaming:
        guarded = _streaming_request(behavior, handler.response_streaming)
    else:
        guarded = _unary_request(behavior, handler.response_streaming)
    return handler._replace(request_deserializer=deserialize, **{kind: guarded})


# -- the wrappers, one per kind of handler ---------------------------------------------------


async def _refuse(request: _Undecodable, context: Any) -> None:
    await context.abort(_INVALID, request.log(context.peer()))


def _refuse_sync(request: _Undecodable, context: Any) -> None:
    """From grpc's thread pool: the sync context's abort raises there."""
    context.abort(_INVALID, request.log(context.peer()))


def _unary_request(behavior: Callable, response_streaming: bool) -> Callable:
    if inspect.isasyncgenfunction(behavior):

        async def async_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            if isinstance(request, _Undecodable):
                await _refuse(request, context)
            async for response in behavior(request, context):
                yield response

        return async_stream
    if inspect.iscoroutinefunction(behavior):  # unary, or a stream written with context.write

        async def coroutine(request: Any, context: Any) -> Any:
            if isinstance(request, _Undecodable):
                await _refuse(request, context)
            return await behavior(request, context)

        return coroutine
    if response_streaming:
        # grpc calls a sync stream handler on the event loop and iterates what it returns
        # in its thread pool: refuse from inside the iteration, where blocking is allowed.

        def sync_stream(request: Any, context: Any) -> Iterator[Any]:
            with _aborted_ends_the_stream():
                if isinstance(request, _Undecodable):
                    _refuse_sync(request, context)
                yield from behavior(request, context)

        return sync_stream

    def sync_unary(request: Any, context: Any) -> Any:  # runs in grpc's thread pool
        if isinstance(request, _Undecodable):
            _refuse_sync(request, context)
        return behavior(request, context)

    return sync_unary


@contextlib.contextmanager
def _aborted_ends_the_stream() -> Iterator[None]:
    """A sync stream handler runs in grpc's thread pool, whose result nobody reads once
    the call is aborted: its AbortError would be logged as never retrieved. The status is
    sent already and grpc raises the same error on the event loop, so end quietly."""
    try:
        yield
    except grpc.aio.AbortError:
        return


class _CheckedContext:
    """The servicer context, with ``read()`` refusing an undecodable message."""

    def __init__(self, context: Any) -> None:
        self._context = context

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def read(self) -> Any:
        message = await self._context.read()
        if isinstance(message, _Undecodable):
            await _refuse(message, self._context)
        return message


async def _checked_async(requests: Any, context: Any) -> AsyncIterator[Any]:
    async for message in requests:
        if isinstance(message, _Undecodable):
            await _refuse(message, context)
        yield message


def _checked_sync(requests: Iterator[Any], context: Any) -> Iterator[Any]:
    for message in requests:  # read in grpc's thread pool, by the sync handler
        if isinstance(message, _Undecodable):
            _refuse_sync(message, context)
        yield message


def _streaming_request(behavior: Callable, response_streaming: bool) -> Callable:
    if inspect.isasyncgenfunction(behavior):

        async def async_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
            checked = _CheckedContext(context)
            async for response in behavior(_checked_async(requests, context), checked):
                yield response

        return async_stream
    if inspect.iscoroutinefunction(behavior):

        async def coroutine(requests: Any, context: Any) -> Any:
            return await behavior(_checked_async(requests, context), _CheckedContext(context))

        return coroutine
    if response_streaming:

        def sync_stream(requests: Iterator[Any], context: Any) -> Iterator[Any]:
            with _aborted_ends_the_stream():
                yield from behavior(_checked_sync(requests, context), context)

        return sync_stream

    def sync_unary(requests: Iterator[Any], context: Any) -> Any:
        return behavior(_checked_sync(requests, context), context)

    return sync_unary


# -- naming what is wrong --------------------------------------------------------------------


def _explain(parse: Callable, data: bytes, error: DecodeError) -> str:
    """The decoder's message, with the string field that is not valid UTF-8 named when
    that is the fault (protobuf only says "String field had bad UTF-8")."""
    descriptor = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
    if isinstance(descriptor, Descriptor):
        path = _bad_utf8_field(descriptor, data)
        if path is not None:
            return f"{path} is not valid UTF-8 (text fields must be valid Unicode)"
    return str(error)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _bad_utf8_field(descriptor: Descriptor, data: bytes, prefix: str = "") -> str | None:
    """The path (``chat.messages[0].content``) of the first string field in ``data`` whose
    bytes are not UTF-8, walking the wire format by ``descriptor``; None if there is none
    or the bytes are malformed otherwise."""
    counts: dict[int, int] = {}  # field number -> items of a repeated field seen
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
                continue
            if wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
                continue
            if wire_type != 2:
                return None  # groups: not in our protos
            size, pos = _varint(data, pos)
            chunk, pos = data[pos:pos + size], pos + size
            field = descriptor.fields_by_number.get(number)
            if field is None:
                continue
            name = prefix + field.name
            if field.is_repeated:
                index = counts[number] = counts.get(number, -1) + 1
                name += f"[{index}]"
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    chunk.decode("utf-8")
                except UnicodeDecodeError:
                    return name
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                found = _bad_utf8_field(field.message_type, chunk, name + ".")
                if found is not None:
                    return found
    except ValueError:
        return None
    return None
