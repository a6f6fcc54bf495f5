"""The gateway's link to the scheduler: a ZeroMQ DEALER, protobuf both ways.

One reader task receives ``EngineOutputs``, reads its token columns back as one
``OutputRow`` per sequence (``common.wire.output_rows``: plain objects, not messages),
and hands each to the queue of the request that owns it, so any number of streams
share one socket. Status queries are answered through futures keyed by a query id. On
TCP, with keys, the socket is a CURVE client that also checks the scheduler's public key.

Both ends watch each other, so no stream waits forever on a dead or hung peer:

    gateway ── Heartbeat (every pulse_interval) ──► scheduler: silent for heartbeat_timeout
            ── StatusQuery (every pulse_interval) ─►   -> it aborts our sequences
            ◄── anything (outputs, status replies) ── silent for scheduler_timeout
                                                         -> we fail our open sequences

When the scheduler is lost (nothing from it for ``scheduler_timeout``, or a status
reply from a new scheduler process, which never saw our sequences) every open sequence
ends with error_kind "unavailable", new requests are refused at once
(``EngineUnavailable``), and ``serving`` is False, until it answers again; then the
sequences failed meanwhile are aborted there, in case it was only slow. Sends never
block: a scheduler that is not connected, or not reading, is unavailable now.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from typing import Any

import zmq
import zmq.asyncio

from tessera.common.curve import ClientKeys
from tessera.common.wire import OutputRow, WireError, decode, output_rows
from tessera.proto.tessera.v1 import engine_pb2

logger = logging.getLogger(__name__)


class EngineUnavailable(RuntimeError):
    """The scheduler did not answer in time, is not connected, or was lost."""


_PULSE_QUERY = 0  # the query id of the pulse's status queries (status() counts from 1)


class EngineClient:
    def __init__(
        self,
        scheduler_address: str,
        status_timeout: float = 5.0,
        curve: ClientKeys | None = None,
        heartbeat_timeout: float = 10.0,
        scheduler_timeout: float = 5.0,
        pulse_interval: float = 1.0,
    ) -> None:
        self.identity = f"gw-{uuid.uuid4().hex[:12]}"
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.IDENTITY, self.identity.encode())
        self._sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:  # CURVE on a TCP link (executor.curve)
            curve.secure(self._sock, scheduler_address)
        # Queue nothing for a scheduler that is not connected: a send fails at once.
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        self._sock.connect(scheduler_address)
        self._queues: dict[str, Any] = {}  # asyncio.Queue, or a pool's tap
        self._status: dict[int, asyncio.Future] = {}
        self._query_ids = itertools.count(1)
        self._status_timeout = status_timeout
        self._heartbeat_timeout = heartbeat_timeout
        self._scheduler_timeout = scheduler_timeout
        self._pulse_interval = pulse_interval
        self._reader: asyncio.Task | None = None
        self._pulse: asyncio.Task | None = None
        self.last_status: engine_pb2.StatusReply | None = None  # the latest reply
        self.lost_reason: str | None = None  # why the scheduler counts as lost; None: it is not
        self._last_heard: float | None = None  # monotonic; None until it first answers
        self._instance_id = ""  # the scheduler process that answers
        self._orphans: set[str] = set()  # to abort once the scheduler answers again

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read_loop())
        self._pulse = loop.create_task(self._pulse_loop())

    async def close(self) -> None:
        try:
            await self._send(engine_pb2.GatewayMessage(goodbye=True))
        except EngineUnavailable:
            pass
        for task in (self._reader, self._pulse):
            if task is not None:
                task.cancel()
        self._sock.close(linger=0)
        self._ctx.term()

    @property
    def serving(self) -> bool:
        """The scheduler answers and has an executor attached (what health reports): not
        while it recovers from an executor's loss, though its streams wait and go on, so
        that a load balancer sends new work elsewhere meanwhile (issue 19)."""
        return (
            self.lost_reason is None
            and self.last_status is not None
            and self.last_status.state == engine_pb2.ENGINE_STATE_SERVING
        )

    def open(self, request_ids: list[str], queue: Any = None) -> Any:
        """One queue for all sequences of a request; items are OutputRow or Rejection.
        ``queue``: anything with ``put_nowait`` instead of a new asyncio.Queue (the
        replica pool's taps, services.engine_pool)."""
        queue = asyncio.Queue() if queue is None else queue
        for rid in request_ids:
            self._queues[rid] = queue
        return queue

    @property
    def instance_id(self) -> str:
        """The scheduler process last heard from; empty until it answered."""
        return self._instance_id

    def queue_for(self, request_id: str) -> asyncio.Queue | None:
        return self._queues.get(request_id)

    def close_ids(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._queues.pop(rid, None)

    async def add(self, sequences: list[engine_pb2.AddSequence]) -> None:
        """Send the sequences (admitted or rejected later, through their queue);
        EngineUnavailable at once if the scheduler is lost or not connected."""
        if self.lost_reason is not None:
            raise EngineUnavailable(f"the engine is unavailable: {self.lost_reason}")
        msg = engine_pb2.GatewayMessage(add=engine_pb2.AddRequests(sequences=sequences))
        await self._send(msg)

    async def abort(self, request_ids: list[str]) -> None:
        """Best effort, never raises: what cannot be sent now is sent when the scheduler
        answers again."""
        if request_ids:
            msg = engine_pb2.GatewayMessage(abort=engine_pb2.AbortRequests(request_ids=request_ids))
            try:
                await self._send(msg)
            except EngineUnavailable:
                self._orphans.update(request_ids)

    async def status(
        self, timeout: float | None = None, reset_prefix_cache: bool = False
    ) -> engine_pb2.StatusReply:
        """The scheduler's StatusReply; EngineUnavailable if it does not answer in time, or
        at once while it counts as lost (the pulse keeps asking meanwhile). With
        reset_prefix_cache the scheduler drops its cached prefixes before answering."""
        if self.lost_reason is not None:
            raise EngineUnavailable(f"the engine is unavailable: {self.lost_reason}")
        query_id = next(self._query_ids)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._status[query_id] = fut
        try:
            await self._send(
                engine_pb2.GatewayMessage(
                    status=engine_pb2.StatusQuery(
                        query_id=query_id, reset_prefix_cache=reset_prefix_cache
                    )
                )
            )
            return await asyncio.wait_for(fut, timeout or self._status_timeout)
        except TimeoutError as e:
            raise EngineUnavailable("the scheduler did not answer a status query") from e
        finally:
            self._status.pop(query_id, None)

    async def _send(self, msg: engine_pb2.GatewayMessage) -> None:
        try:
            await self._sock.send(msg.SerializeToString(), flags=zmq.NOBLOCK)
        except zmq.Again:  # not connected, or its queue is full: it is not reading
            raise EngineUnavailable("the scheduler is not connected or not reading") from None

    async def _pulse_loop(self) -> None:
        heartbeat = engine_pb2.GatewayMessage(
            heartbeat=engine_pb2.Heartbeat(timeout_ms=round(self._heartbeat_timeout * 1000))
        )
        query = engine_pb2.GatewayMessage(status=engine_pb2.StatusQuery(query_id=_PULSE_QUERY))
        stalled = False
        while True:
            for msg in (heartbeat, query):
                try:
                    await self._send(msg)
                except EngineUnavailable:
                    pass  # the silence says it
            heard = self._last_heard
            # After a stall of our own loop (a start-up's CPU-bound work, a loaded machine)
            # the replies wait unread in the socket: the reader gets a pulse to read them
            # before the scheduler is blamed for a silence that was ours.
            if self.lost_reason is None and heard is not None and not stalled:
                silent = time.monotonic() - heard
                if silent > self._scheduler_timeout:
                    self._lose(f"the scheduler sent nothing for {silent:.1f}s")
            woke_at = time.monotonic() + self._pulse_interval
            await asyncio.sleep(self._pulse_interval)
            stalled = time.monotonic() - woke_at > self._pulse_interval

    def _lose(self, reason: str) -> None:
        self.lost_reason = reason
        logger.error("%s: %d open sequences fail as unavailable", reason, len(self._queues))
        self._fail_open(f"the engine is unavailable: {reason}")

    def _fail_open(self, message: str) -> None:
        """End every open sequence with error_kind "unavailable"."""
        for request_id, queue in list(self._queues.items()):  # a tap may close ids
            queue.put_nowait(
                OutputRow(
                    request_id,
                    [],
                    finished=True,
                    finish_reason="error",
                    error=message,
                    error_kind="unavailable",
                )
            )
            self._orphans.add(request_id)

    async def _heard_from_scheduler(self, out: engine_pb2.EngineOutputs) -> None:
        self._last_heard = time.monotonic()
        if out.HasField("status") and out.status.instance_id != self._instance_id:
            if self._instance_id:  # a new process: what the old one ran is gone with it
                logger.warning("the scheduler was restarted")
                self._fail_open("the engine is unavailable: the scheduler was restarted")
                self._orphans.clear()
            self._instance_id = out.status.instance_id
        if self.lost_reason is not None:
            logger.warning("the scheduler answers again")
            self.lost_reason = None
        if self._orphans:
            orphans, self._orphans = sorted(self._orphans), set()
            await self.abort(orphans)

    async def _read_loop(self) -> None:
        while True:
            data = await self._sock.recv()
            try:
                out = decode(engine_pb2.EngineOutputs, data)
                outputs = output_rows(out)
            except WireError as e:
                logger.warning(
                    "dropped a malformed message from the scheduler (%d bytes): %s", len(data), e
                )
                continue
            for seq in outputs:
                queue = self._queues.get(seq.request_id)
                if queue is not None:
                    queue.put_nowait(seq)
            for rej in out.rejected:
                queue = self._queues.get(rej.request_id)
                if queue is not None:
                    queue.put_nowait(rej)
            if out.HasField("status"):
                self.last_status = out.status
                fut = self._status.get(out.status.query_id)
                if fut is not None and not fut.done():
                    fut.set_result(out.status)
            await self._heard_from_scheduler(out)
