"""The floor under the gateway's cost per streamed token: a bare grpc.aio server (uvloop,
as the gateway runs) streaming one-token GenerateResponse messages to many streams at
once, and its client; each process's CPU per message.

    .venv/bin/python benchmarks/grpc_stream_floor.py --streams 200 --tokens 150

Every stream yields control after each message, as the gateway's streams do (each
message is a wake-up of its stream's task by the step's outputs). Compare the server's
figure with the gateway's in benchmarks/served_overhead.py: the difference is what
Tessera adds per token (reading the step's rows, the queue, the delta, the response).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import time

import grpc

from tessera.proto.tessera.v1 import generate_pb2 as pb
from tessera.proto.tessera.v1 import generate_pb2_grpc as pb_grpc


class _Streamer(pb_grpc.TesseraServicer):
    async def Generate(self, request, context):  # noqa: N802
        for i in range(request.sampling.max_tokens):
            yield pb.GenerateResponse(request_id="r", token_ids=[i])
            await asyncio.sleep(0)  # the others' turn, as a step's outputs interleave


def _serve(port: int, ready) -> None:
    import uvloop

    async def main() -> None:
        server = grpc.aio.server()
        pb_grpc.add_TesseraServicer_to_server(_Streamer(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    uvloop.run(main())


async def _read_all(port: int, streams: int, tokens: int, connections: int) -> int:
    channels = [
        grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(connections)
    ]
    stubs = [pb_grpc.TesseraStub(c) for c in channels]
    request = pb.GenerateRequest(sampling=pb.SamplingParameters(max_tokens=tokens))

    async def one(i: int) -> int:
        return sum([len(m.token_ids) async for m in stubs[i % connections].Generate(request)])

    try:
        return sum(await asyncio.gather(*(one(i) for i in range(streams))))
    finally:
        for c in channels:
            await c.close()


def _now(server_pid: int) -> tuple[float, float, float]:
    """This process's CPU seconds, the server's, and the wall clock."""
    from served_overhead import cpu_seconds  # benchmarks/ on sys.path

    return time.process_time(), cpu_seconds(server_pid), time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=150, help="messages a stream")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    server = ctx.Process(target=_serve, args=(port, ready), daemon=True)
    server.start()
    ready.wait(60)
    try:
        asyncio.run(_read_all(port, args.streams, 10, args.connections))  # warm-up
        for _ in range(args.repeats):
            client0, server0, wall0 = _now(server.pid)
            n = asyncio.run(_read_all(port, args.streams, args.tokens, args.connections))
            client1, server1, wall1 = _now(server.pid)
            per_server, per_client = (server1 - server0) / n, (client1 - client0) / n
            print(
                f"{n} messages in {wall1 - wall0:.2f} s: server {1e6 * per_server:.1f} "
                f"us/message, client {1e6 * per_client:.1f} us/message"
            )
    finally:
        server.terminate()
        server.join()


if __name__ == "__main__":
    main()
