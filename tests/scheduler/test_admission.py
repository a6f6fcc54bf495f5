"""The scheduler server's bounds and its watch on the gateways, in process (issue 5).

Messages go straight into ``SchedulerServer.handle_message`` and steps run on the
mirror executor, so every assertion is about exact queue contents: an n > 1 request is
admitted whole or not at all, the waiting queue is bounded in sequences and in tokens,
and a gateway that sent heartbeats and fell silent has its requests aborted, their
blocks freed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import zmq

from tessera.common.plan import SamplingOptions
from tessera.common.wire import sampling_to_pb
from tessera.proto.tessera.v1 import engine_pb2 as pb
from tessera.scheduler.config import SchedulerServerConfig
from tessera.scheduler.server import SchedulerServer
from tests.scheduler.mirror_executor import InstantLink
from tests.scheduler.test_server_inputs import INFO

GW, OTHER = b"gw-a", b"gw-b"


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def make_server(ctx: zmq.Context, **overrides) -> SchedulerServer:
    config = SchedulerServerConfig(block_size=INFO.block_size, **overrides)
    router = ctx.socket(zmq.ROUTER)
    executor = InstantLink(ctx, INFO.block_size)
    return SchedulerServer(config, INFO, executor, router, threading.Event())


def seq(request_id: str, num_prompt_tokens: int = 3, max_tokens: int = 8) -> pb.AddSequence:
    return pb.AddSequence(
        request_id=request_id,
        prompt_token_ids=[1 + i % 9 for i in range(num_prompt_tokens)],
        sampling=sampling_to_pb(SamplingOptions(temperature=0.0)),
        stop=pb.StopConditions(max_tokens=max_tokens, ignore_eos=True),
    )


def send(server: SchedulerServer, gateway: bytes, msg: pb.GatewayMessage) -> pb.EngineOutputs:
    """Handle one message; what it queued for that gateway (taken from the outbox)."""
    server.handle_message([gateway, msg.SerializeToString()])
    out = server.sessions.take(gateway)
    return pb.EngineOutputs() if out is None else out


def add(server: SchedulerServer, gateway: bytes, *sequences: pb.AddSequence) -> pb.EngineOutputs:
    return send(server, gateway, pb.GatewayMessage(add=pb.AddRequests(sequences=sequences)))


def step(server: SchedulerServer) -> None:
    plan = server.schedule()
    assert plan is not None
    server.start_step(plan)
    server.process_result(plan, server.finish_step(plan))


def rejections(out: pb.EngineOutputs) -> dict[str, str]:
    return {r.request_id: r.kind for r in out.rejected}


def test_an_n_request_is_admitted_whole_or_not_at_all(ctx):
    server = make_server(ctx, max_num_seqs=2, max_waiting=6)
    assert not add(server, GW, *[seq(f"w{i}") for i in range(6)]).rejected
    step(server)  # two run, four wait: two waiting slots remain
    assert (server.scheduler.num_running, server.scheduler.num_waiting) == (2, 4)
    out = add(server, GW, *[seq(f"n/{j}") for j in range(4)])  # n = 4
    assert rejections(out) == {f"n/{j}": "overloaded" for j in range(4)}
    assert "max_waiting=6" in out.rejected[0].message
    assert server.scheduler.num_waiting == 4 and not any(
        server.scheduler.get_request(f"n/{j}") for j in range(4)
    )
    assert not add(server, GW, *[seq(f"m/{j}") for j in range(2)]).rejected  # n = 2 fits
    assert server.scheduler.num_waiting == 6
    server.scheduler.check_invariants()


def test_waiting_tokens_are_bounded(ctx):
    server = make_server(ctx, max_num_seqs=1, max_waiting=100, max_waiting_tokens=20)
    assert not add(server, GW, seq("a", 8), seq("b", 8)).rejected
    out = add(server, GW, seq("c", 3), seq("d", 2))  # 16 + 5 > 20: neither
    assert rejections(out) == {"c": "overloaded", "d": "overloaded"}
    assert "16 tokens are waiting" in out.rejected[0].message
    assert not add(server, GW, seq("e", 4)).rejected  # 20: exactly full
    out = add(server, GW, seq("f", 21))  # can never fit: the client's fault
    assert rejections(out) == {"f": "invalid"} and "never fit" in out.rejected[0].message
    step(server)  # "a" runs: its tokens no longer wait
    assert server.scheduler.num_running == 1
    assert not add(server, GW, seq("g", 8)).rejected
    assert server.num_waiting_tokens() == 20
    with pytest.raises(ValueError, match="max_waiting_tokens"):
        SchedulerServerConfig(max_waiting_tokens=0)


def test_a_silent_gateway_is_forgotten_and_its_blocks_freed(ctx):
    server = make_server(ctx, max_num_seqs=2)
    send(server, GW, pb.GatewayMessage(heartbeat=pb.Heartbeat(timeout_ms=2500)))
    assert server.sessions.watched[GW][0] == 2.5
    add(server, GW, seq("g1"), seq("g2"), seq("g3"))  # two run, one waits
    add(server, OTHER, seq("o1"))  # a gateway without heartbeats: never expires
    step(server)
    assert server.scheduler.num_used_blocks > 0
    # Any message refreshes the watch, a bad one too.
    server.sessions.watched[GW] = (2.5, time.monotonic() - 100)
    server.handle_message([GW, b"\xff garbage"])
    server.expire_gateways()
    assert server.scheduler.num_running + server.scheduler.num_waiting == 4
    # Silent past the timeout: failed, blocks free, nothing more sent to it.
    server.sessions.watched[GW] = (2.5, time.monotonic() - 2.6)
    server.expire_gateways()
    assert GW not in server.sessions.watched and GW not in server.sessions.outbox
    assert [r.request_id for r in server.scheduler.running + server.scheduler.waiting] == ["o1"]
    assert server.counters.num_requests_failed == 3  # "unavailable": sent, if it listens
    server.scheduler.check_invariants()
    # A timeout of 0 ends the watch; absurd ones are held to [1 s, 1 h].
    send(server, OTHER, pb.GatewayMessage(heartbeat=pb.Heartbeat(timeout_ms=1)))
    assert server.sessions.watched[OTHER][0] == 1.0
    send(server, OTHER, pb.GatewayMessage(heartbeat=pb.Heartbeat(timeout_ms=0)))
    assert OTHER not in server.sessions.watched


def test_status_names_the_scheduler_process(ctx):
    first, second = make_server(ctx), make_server(ctx)
    query = pb.GatewayMessage(status=pb.StatusQuery(query_id=7))

    def status(server: SchedulerServer) -> pb.StatusReply:
        server.handle_message([GW, query.SerializeToString()])  # sent at once, not queued
        return server.last_status

    for server in (first, second):
        server.send = lambda gateway, out, s=server: setattr(s, "last_status", out.status)
    a, b = status(first), status(second)
    assert a.query_id == 7 and len(a.instance_id) == 32
    assert a.instance_id == status(first).instance_id != b.instance_id
