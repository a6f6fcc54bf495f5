"""The gateway's link to the scheduler watches it (issue 5), against a fake scheduler.

The fake is a ROUTER in this process that answers status queries while told to, and
records what the gateway sends: heartbeats, adds, aborts. Timeouts are short, so each
case takes about a second: a silent scheduler fails the open sequences as unavailable
and refuses new ones at once; when it answers again the failed sequences are aborted
there; a new scheduler process (another instance id) fails what the old one ran.
"""

from __future__ import annotations

import asyncio
import tempfile
import time

import pytest
import zmq
import zmq.asyncio

from tessera.proto.tessera.v1 import engine_pb2 as pb
from tessera.services.engine_client import EngineClient, EngineUnavailable

PULSE = 0.05
SCHEDULER_TIMEOUT = 1.0


class FakeScheduler:
    def __init__(self, ctx: zmq.asyncio.Context, address: str) -> None:
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(address)
        self.answering = True
        self.instance_id = "first"
        self.state = pb.ENGINE_STATE_SERVING
        self.received: list[pb.GatewayMessage] = []
        self.last_sent = time.monotonic()
        self.task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            gateway, data = await self.socket.recv_multipart()
            msg = pb.GatewayMessage.FromString(data)
            self.received.append(msg)
            if msg.WhichOneof("kind") == "status" and self.answering:
                reply = pb.StatusReply(
                    query_id=msg.status.query_id, state=self.state, instance_id=self.instance_id
                )
                await self.socket.send_multipart(
                    [gateway, pb.EngineOutputs(status=reply).SerializeToString()]
                )
                self.last_sent = time.monotonic()

    def sent(self, kind: str) -> list[pb.GatewayMessage]:
        return [m for m in self.received if m.WhichOneof("kind") == kind]

    def close(self) -> None:
        self.task.cancel()
        self.socket.close()


async def until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def run(test) -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            address = f"ipc://{tmp}/scheduler.sock"
            ctx = zmq.asyncio.Context()
            scheduler = FakeScheduler(ctx, address)
            client = EngineClient(
                address, heartbeat_timeout=4.0, scheduler_timeout=SCHEDULER_TIMEOUT,
                pulse_interval=PULSE,
            )  # fmt: skip
            client.start()
            try:
                await test(scheduler, client)
            finally:
                scheduler.close()
                await client.close()
                ctx.term()

    asyncio.run(main())


def test_heartbeats_and_health_follow_the_scheduler():
    async def check(scheduler: FakeScheduler, client: EngineClient) -> None:
        await until(lambda: client.serving)
        await until(lambda: scheduler.sent("heartbeat"))  # the first may beat the connection
        assert scheduler.sent("heartbeat")[0].heartbeat.timeout_ms == 4000
        scheduler.state = pb.ENGINE_STATE_RECOVERING  # no executor attached: not serving
        await until(lambda: not client.serving)
        assert client.lost_reason is None  # streams wait and go on
        scheduler.state = pb.ENGINE_STATE_SERVING
        await until(lambda: client.serving)
        scheduler.state = pb.ENGINE_STATE_UNAVAILABLE
        await until(lambda: not client.serving)
        assert client.lost_reason is None  # it answers: new requests are its to refuse
        scheduler.state = pb.ENGINE_STATE_SERVING
        await until(lambda: client.serving)

    run(check)


def test_a_silent_scheduler_fails_open_sequences_then_they_are_aborted_there():
    async def check(scheduler: FakeScheduler, client: EngineClient) -> None:
        await until(lambda: client.serving)
        queue = client.open(["s/0", "s/1"])
        await client.add([pb.AddSequence(request_id="s/0"), pb.AddSequence(request_id="s/1")])
        scheduler.answering = False
        outs = [await asyncio.wait_for(queue.get(), 3) for _ in range(2)]
        # The client's silence counts from the last reply it heard, which may predate
        # the moment answering stopped by up to a pulse: measure from that reply.
        silent = scheduler.last_sent
        assert SCHEDULER_TIMEOUT <= time.monotonic() - silent < SCHEDULER_TIMEOUT + 0.5
        for out, rid in zip(outs, ["s/0", "s/1"], strict=True):
            assert (out.request_id, out.finished, out.finish_reason) == (rid, True, "error")
            assert out.error_kind == "unavailable" and "sent nothing" in out.error
        assert not client.serving and client.lost_reason
        started = time.monotonic()
        with pytest.raises(EngineUnavailable, match="sent nothing"):
            await client.add([pb.AddSequence(request_id="t/0")])
        with pytest.raises(EngineUnavailable, match="sent nothing"):
            await client.status(timeout=5)
        assert time.monotonic() - started < 0.1
        scheduler.answering = True
        await until(lambda: client.serving)
        await until(lambda: scheduler.sent("abort"))
        assert list(scheduler.sent("abort")[0].abort.request_ids) == ["s/0", "s/1"]
        await client.add([pb.AddSequence(request_id="t/1")])

    run(check)


def test_a_restarted_scheduler_fails_what_the_old_one_ran():
    async def check(scheduler: FakeScheduler, client: EngineClient) -> None:
        await until(lambda: client.serving)
        queue = client.open(["r/0"])
        await client.add([pb.AddSequence(request_id="r/0")])
        scheduler.instance_id = "second"
        out = await asyncio.wait_for(queue.get(), 2)
        assert out.error_kind == "unavailable" and "restarted" in out.error
        assert client.serving
        await asyncio.sleep(3 * PULSE)
        assert not scheduler.sent("abort")  # the new one never saw it

    run(check)


def test_sends_never_block_on_an_absent_scheduler():
    async def main() -> None:
        client = EngineClient("ipc:///tmp/tessera-test-nobody-here.sock", pulse_interval=PULSE)
        client.start()
        try:
            started = time.monotonic()
            with pytest.raises(EngineUnavailable, match="not connected"):
                await client.add([pb.AddSequence(request_id="x")])
            await client.abort(["x"])  # best effort: never raises
            with pytest.raises(EngineUnavailable):
                await client.status(timeout=0.2)
            assert time.monotonic() - started < 1.0 and not client.serving
        finally:
            await client.close()

    asyncio.run(main())


def test_a_stall_of_the_gateways_own_loop_is_not_blamed_on_the_scheduler():
    """Issue 20: at start-up a gateway busy with CPU-bound work (a tokenizer loading)
    logged `the scheduler sent nothing for 24s` although the replies sat unread in its
    socket. Here the loop (the fake scheduler's too) is held past the timeout; once free,
    the reader gets its turn before the silence is judged, and nothing is lost."""

    async def check(scheduler: FakeScheduler, client: EngineClient) -> None:
        await until(lambda: client.serving)
        queue = client.open(["s/0"])
        await client.add([pb.AddSequence(request_id="s/0")])
        time.sleep(2 * SCHEDULER_TIMEOUT)  # the loop is held: nothing is read or sent
        await asyncio.sleep(10 * PULSE)
        assert client.lost_reason is None and client.serving
        assert queue.empty()  # the open sequence was not failed
        scheduler.answering = False  # a real silence is still noticed
        out = await asyncio.wait_for(queue.get(), 3)
        assert out.error_kind == "unavailable" and "sent nothing" in out.error

    run(check)
