"""``proto.guard.DecodeGuard`` covers every method shape and every kind of handler
(issue 19): requests that do not parse are INVALID_ARGUMENT with one warning line, never
UNKNOWN with grpc's "Unexpected error" traceback.

In process, over real channels: a service with each of the four shapes written each way
grpc.aio takes a handler (coroutine, async generator, sync function or generator, a
stream read through ``context.read()``), and the servers the gateway and a tokenizer
replica build (``grpc_server``), whose methods come from their reflection service. The
served processes get the same garbage in ``test_hostile_input``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tessera.proto.guard import DecodeGuard
from tessera.services.gateway import GatewayConfig, TesseraServicer
from tessera.services.gateway import grpc_server as gateway_server
from tessera.tokenizer_svc.server import grpc_server as tokenizer_server
from tessera.tokenizer_svc.server import load_tokenizer
from tests.services.grpc_methods import GARBAGE, Method, send_raw, served_methods

Request = health_pb2.HealthCheckRequest
Reply = health_pb2.HealthCheckResponse
SERVING = Reply(status=Reply.SERVING)


# -- one service, every shape written every way -----------------------------------------------


async def uu_coroutine(request, context):
    return SERVING


def uu_sync(request, context):
    return SERVING


async def us_async_generator(request, context):
    yield SERVING


async def us_coroutine(request, context):  # grpc's health Watch is written so
    await context.write(SERVING)


def us_sync_generator(request, context):
    yield SERVING


async def su_coroutine(requests, context):
    return Reply(status=len([r async for r in requests]))


async def su_read(requests, context):  # the reader API instead of the iterator
    count = 0
    while (await context.read()) is not grpc.aio.EOF:
        count += 1
    return Reply(status=count)


def su_sync(requests, context):
    return Reply(status=len(list(requests)))


async def ss_async_generator(requests, context):  # grpc's reflection is written so
    async for _ in requests:
        yield SERVING


async def ss_coroutine(requests, context):
    async for _ in requests:
        await context.write(SERVING)


def ss_sync_generator(requests: Iterator, context) -> Iterator:
    for _ in requests:
        yield SERVING


SHAPES = {
    "uu_coroutine": (grpc.unary_unary_rpc_method_handler, uu_coroutine, False, False),
    "uu_sync": (grpc.unary_unary_rpc_method_handler, uu_sync, False, False),
    "us_async_generator": (grpc.unary_stream_rpc_method_handler, us_async_generator, False, True),
    "us_coroutine": (grpc.unary_stream_rpc_method_handler, us_coroutine, False, True),
    "us_sync_generator": (grpc.unary_stream_rpc_method_handler, us_sync_generator, False, True),
    "su_coroutine": (grpc.stream_unary_rpc_method_handler, su_coroutine, True, False),
    "su_read": (grpc.stream_unary_rpc_method_handler, su_read, True, False),
    "su_sync": (grpc.stream_unary_rpc_method_handler, su_sync, True, False),
    "ss_async_generator": (grpc.stream_stream_rpc_method_handler, ss_async_generator, True, True),
    "ss_coroutine": (grpc.stream_stream_rpc_method_handler, ss_coroutine, True, True),
    "ss_sync_generator": (grpc.stream_stream_rpc_method_handler, ss_sync_generator, True, True),
}  # fmt: skip


def _no_traceback(caplog) -> None:
    """grpc logs a servicer's exception (an unparsed request among them) with its traceback."""
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


def _serve_and_call(build, calls) -> None:
    """Serve ``build()``'s server on a free port from an event loop in a thread, and run
    ``calls(target)`` (sync clients, pytest's assertions) in this one; then stop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = build()
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        calls(f"127.0.0.1:{port}")
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


def test_every_shape_and_kind_of_handler_refuses_garbage_and_serves_the_rest(caplog):
    def build() -> grpc.aio.Server:
        server = grpc.aio.server(interceptors=[DecodeGuard()])
        handlers = {
            name: make(fn, request_deserializer=Request.FromString,
                       response_serializer=Reply.SerializeToString)
            for name, (make, fn, _, _) in SHAPES.items()
        }  # fmt: skip
        generic = grpc.method_handlers_generic_handler("t.Shapes", handlers)
        server.add_generic_rpc_handlers((generic,))
        return server

    def calls(target: str) -> None:
        valid = Request(service="x").SerializeToString()
        with grpc.insecure_channel(target) as channel:
            for name, (_, _, client_streaming, server_streaming) in SHAPES.items():
                method = Method(f"/t.Shapes/{name}", client_streaming, server_streaming)
                for payload in GARBAGE:
                    with pytest.raises(grpc.RpcError) as err:
                        send_raw(channel, method, payload)
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.value)
                    assert "not a valid message" in err.value.details()
                send_raw(channel, method, valid)  # what parses is served as before
                if client_streaming:  # a good message, then a bad one: refused at the bad one
                    shape = "stream_stream" if server_streaming else "stream_unary"
                    call = getattr(channel, shape)(method.path)
                    with pytest.raises(grpc.RpcError) as err:
                        result = call(iter([valid, GARBAGE[0]]), timeout=10)
                        if server_streaming:
                            list(result)
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            ok = channel.stream_unary("/t.Shapes/su_read")(iter([valid, valid]), timeout=10)
            assert Reply.FromString(ok).status == 2

    with caplog.at_level(logging.WARNING):
        _serve_and_call(build, calls)
    _no_traceback(caplog)
    refused = [r for r in caplog.records if r.name == "tessera.proto.guard"]
    assert len(refused) == len(SHAPES) * len(GARBAGE) + sum(s[2] for s in SHAPES.values())


@pytest.mark.parametrize("which", ["gateway", "tokenizer"])
def test_the_gateway_and_tokenizer_servers_refuse_garbage_on_every_method(which, caplog):
    """The real servers, built as the processes build them; their methods from reflection."""
    pool = ThreadPoolExecutor(1)

    def build() -> grpc.aio.Server:
        if which == "gateway":
            # No request reaches the servicer's core: garbage is refused before it.
            return gateway_server(GatewayConfig(), TesseraServicer(core=None))[0]
        return tokenizer_server(load_tokenizer("smollm2-135m-instruct"), pool)[0]

    seen: list[str] = []

    def calls(target: str) -> None:
        with grpc.insecure_channel(target) as channel:
            methods = served_methods(channel)
            for method in methods:
                with pytest.raises(grpc.RpcError) as err:
                    send_raw(channel, method, GARBAGE[0])
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.value)
                seen.append(method.path)

    with caplog.at_level(logging.WARNING):
        _serve_and_call(build, calls)
    pool.shutdown()
    _no_traceback(caplog)
    # Health (both shapes of it) and reflection (a request stream) among them.
    assert {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"} <= set(seen)
    own = "/tessera.v1.Tessera/Generate" if which == "gateway" else (
        "/tessera.internal.v1.TokenizerService/Tokenize")
    assert own in seen
