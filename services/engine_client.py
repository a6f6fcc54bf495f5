"""The gateway's link to the scheduler: a ZeroMQ DEALER, protobuf both ways.

One reader task receives ``EngineOutputs`` and hands each ``SequenceOutput`` to the
queue of the request that owns it, so any number of streams share one socket. Status
queries are answered through futures keyed by a query id. On TCP, with keys, the
socket is a CURVE client that also checks the scheduler's public key.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid

import zmq
import zmq.asyncio
from google.protobuf.message import DecodeError

from executor.curve import ClientKeys
from proto.tessera.v1 import engine_pb2

logger = logging.getLogger(__name__)


class EngineUnavailable(RuntimeError):
    """The scheduler did not answer in time."""


class EngineClient:
    def __init__(
        self, scheduler_address: str, status_timeout: float = 5.0, curve: ClientKeys | None = None
    ) -> None:
        self.identity = f"gw-{uuid.uuid4().hex[:12]}"
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.IDENTITY, self.identity.encode())
        self._sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:  # CURVE on a TCP link (executor.curve)
            curve.secure(self._sock, scheduler_address)
        self._sock.connect(scheduler_address)
        self._queues: dict[str, asyncio.Queue] = {}
        self._status: dict[int, asyncio.Future] = {}
        self._query_ids = itertools.count(1)
        self._status_timeout = status_timeout
        self._reader: asyncio.Task | None = None

    def start(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    async def close(self) -> None:
        try:
            await self._send(engine_pb2.GatewayMessage(goodbye=True))
        except zmq.ZMQError:
            pass
        if self._reader is not None:
            self._reader.cancel()
        self._sock.close(linger=0)
        self._ctx.term()

    def open(self, request_ids: list[str]) -> asyncio.Queue:
        """One queue for all sequences of a request; items are SequenceOutput or Rejection."""
        queue: asyncio.Queue = asyncio.Queue()
        for rid in request_ids:
            self._queues[rid] = queue
        return queue

    def queue_for(self, request_id: str) -> asyncio.Queue | None:
        return self._queues.get(request_id)

    def close_ids(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._queues.pop(rid, None)

    async def add(self, sequences: list[engine_pb2.AddSequence]) -> None:
        msg = engine_pb2.GatewayMessage(add=engine_pb2.AddRequests(sequences=sequences))
        await self._send(msg)

    async def abort(self, request_ids: list[str]) -> None:
        if request_ids:
            msg = engine_pb2.GatewayMessage(abort=engine_pb2.AbortRequests(request_ids=request_ids))
            await self._send(msg)

    async def status(self, timeout: float | None = None) -> engine_pb2.StatusReply:
        query_id = next(self._query_ids)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._status[query_id] = fut
        try:
            await self._send(
                engine_pb2.GatewayMessage(status=engine_pb2.StatusQuery(query_id=query_id))
            )
            return await asyncio.wait_for(fut, timeout or self._status_timeout)
        except TimeoutError as e:
            raise EngineUnavailable("the scheduler did not answer a status query") from e
        finally:
            self._status.pop(query_id, None)

    async def _send(self, msg: engine_pb2.GatewayMessage) -> None:
        await self._sock.send(msg.SerializeToString())

    async def _read_loop(self) -> None:
        while True:
            data = await self._sock.recv()
            out = engine_pb2.EngineOutputs()
            try:
                out.ParseFromString(data)
            except DecodeError:
                logger.warning(
                    "dropped a malformed message from the scheduler (%d bytes)", len(data)
                )
                continue
            for seq in out.outputs:
                queue = self._queues.get(seq.request_id)
                if queue is not None:
                    queue.put_nowait(seq)
            for rej in out.rejected:
                queue = self._queues.get(rej.request_id)
                if queue is not None:
                    queue.put_nowait(rej)
            if out.HasField("status"):
                fut = self._status.get(out.status.query_id)
                if fut is not None and not fut.done():
                    fut.set_result(out.status)
