"""A stray peer on the executor's socket during an executor restart (issue 19, defect 3).

The scheduler's executor socket is a file in the run directory that any process of the
same user can connect to. Once it was a PAIR: a stray that connected right after an
executor died held it, the new executor was refused, and the engine waited the whole
executor_start_timeout. Now only the executor the scheduler started is heard
(scheduler/executor_link.py).

One launcher serves the module, in order: an undisturbed run of greedy gRPC streams
gives each stream's tokens; then the executor is killed (SIGKILL) mid-stream, first
alone (how long a restart takes here), then with a stray PAIR, then with a stray DEALER
that also claims to be a ready executor and answers steps, each connected the moment
the scheduler has seen the loss, before the new executor. Each time: the restart
completes within its normal time (and far inside executor_start_timeout), every stream
goes on with exactly the undisturbed tokens, the stray got nothing, and the KV pool is
whole. Health during such a restart: the scheduler says RECOVERING and the gateway's
health NOT_SERVING (no executor is attached; services/gateway.py), then SERVING again;
a restart that ran out of executor_start_timeout would say UNAVAILABLE and fail this
test.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import zmq
from grpc_health.v1 import health_pb2

from tessera.common.wire import encode
from tessera.proto.tessera.v1 import engine_pb2
from tests.services.launch import Server
from tests.services.test_failures import health, request, roles, run_streams, wait_pool_whole
from tests.services_internal.test_engine_processes import Gateway

pytestmark = pytest.mark.slow

NUM_STREAMS = 8
# Short, so that a stalled restart fails the test in a minute, not ten.
EXECUTOR_START_TIMEOUT = 90.0
STRAY_INFO = engine_pb2.EngineInfo(model="stray", max_model_len=64, vocab_size=11,
                                   block_size=4, num_kv_blocks=999)  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    env = {"TESSERA_EXECUTOR_START_TIMEOUT": str(EXECUTOR_START_TIMEOUT)}
    s = Server(tmp_path_factory.mktemp("stray"), env=env, max_num_seqs=NUM_STREAMS)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def expected(server) -> list[list[int]]:
    outs, _ = run_streams(server, [request(i) for i in range(NUM_STREAMS)])
    for i, out in enumerate(outs):
        assert out.code == grpc.StatusCode.OK and len(out.tokens) == 24 + i % 5, out.details
    return [out.tokens for out in outs]


class Stray(threading.Thread):
    """Connects to the executor socket and stays until stopped. A PAIR keeps quiet (what
    held the old PAIR link: the scheduler waited for a ready that never came); a DEALER
    talks: a ready of another pool, a result for every step id the scheduler could be
    waiting on, and garbage. Counts what it was sent."""

    def __init__(self, address: str, kind: int) -> None:
        super().__init__(daemon=True)
        self.ctx = zmq.Context()
        self.socket = self.ctx.socket(kind)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)  # now, in the caller's thread: before the new executor
        self.stopping = threading.Event()
        self.num_received = 0
        self.num_sent = 0

    def run(self) -> None:
        ready = encode(engine_pb2.ExecutorReady(info=STRAY_INFO, max_position_embeddings=64))
        step_id = 0
        talks = self.socket.type == zmq.DEALER
        while not self.stopping.is_set():
            step_id += 1
            fake = engine_pb2.StepResult(step_id=step_id, sampled_ids=["x"],
                                         sampled_token_ids=[1])  # fmt: skip
            for message in (ready, encode(fake), b"\x80garbage") if talks else ():
                try:
                    self.socket.send(message, flags=zmq.NOBLOCK)
                    self.num_sent += 1
                except zmq.Again:  # not connected (yet, or ever: a refused PAIR)
                    pass
            while self.socket.poll(0):
                self.socket.recv()
                self.num_received += 1
            time.sleep(0.02)

    def close(self) -> None:
        self.stopping.set()
        self.join(5)
        self.socket.close()
        self.ctx.term()


class RestartWatch(threading.Thread):
    """Asks the scheduler for its status (as a gateway would) and the gateway for its
    health, until the engine serves again with one more executor restart."""

    def __init__(self, server: Server, num_restarts: int) -> None:
        super().__init__(daemon=True)
        self.ctx = zmq.Context()
        self.gateway = Gateway(self.ctx, f"ipc://{server.run_dir}/scheduler.sock")
        self.server, self.num_restarts = server, num_restarts
        self.states: list[int] = []
        self.health: set[int] = set()
        self.started_at = 0.0
        self.seconds: float | None = None  # from the kill to serving again

    def begin(self) -> None:
        """Just after the kill: returns once the scheduler has seen the loss (and is
        starting the next executor), then watches the restart in the background."""
        self.started_at = time.monotonic()
        while True:
            status = self.gateway.status(timeout=10)
            if (status.state != engine_pb2.ENGINE_STATE_SERVING
                    or status.counters.num_executor_restarts > self.num_restarts):  # fmt: skip
                break
            assert time.monotonic() - self.started_at < 10, "the loss was not seen"
        self.states.append(status.state)
        self.start()

    def run(self) -> None:
        deadline = self.started_at + EXECUTOR_START_TIMEOUT + 30
        while time.monotonic() < deadline:
            status = self.gateway.status(timeout=10)
            self.states.append(status.state)
            self.health.add(health(self.server))
            if (status.state == engine_pb2.ENGINE_STATE_SERVING
                    and status.counters.num_executor_restarts > self.num_restarts):  # fmt: skip
                self.seconds = time.monotonic() - self.started_at
                return
            time.sleep(0.1)

    def close(self) -> None:
        self.join(EXECUTOR_START_TIMEOUT + 60)
        self.gateway.socket.close()
        self.ctx.term()


def restarts(server: Server) -> int:
    ctx = zmq.Context()
    gateway = Gateway(ctx, f"ipc://{server.run_dir}/scheduler.sock")
    try:
        return gateway.status(timeout=10).counters.num_executor_restarts
    finally:
        gateway.socket.close()
        ctx.term()


RESTART_SECONDS: dict[str, float] = {}  # by stray, as the tests below measured them


@pytest.mark.parametrize("stray", ["none", "pair", "dealer"])
def test_a_stray_peer_during_an_executor_restart_neither_stalls_it_nor_changes_a_token(
    server, expected, stray, record_property
):
    executor = roles(server)["executor"][0]
    address = f"ipc://{server.run_dir}/executor.sock"
    watch = RestartWatch(server, restarts(server))
    strays: list[Stray] = []

    def kill_and_stray() -> None:
        os.kill(executor, signal.SIGKILL)
        watch.begin()
        if stray != "none":  # the new executor is being started: it connects in a second
            strays.append(Stray(address, zmq.PAIR if stray == "pair" else zmq.DEALER))
            strays[0].start()

    try:
        outs, _ = run_streams(server, [request(i) for i in range(NUM_STREAMS)], kill_and_stray)
        watch.close()
    finally:
        for s in strays:
            s.close()
    seen = f"states {sorted(set(watch.states))}, health {sorted(watch.health)}"
    assert watch.seconds is not None, f"the restart did not complete: {seen}"
    RESTART_SECONDS[stray] = watch.seconds
    record_property("restart_seconds", round(watch.seconds, 2))  # in --junitxml reports
    for i, out in enumerate(outs):
        assert out.code == grpc.StatusCode.OK, out.details
        assert out.tokens == expected[i], f"stream {i}: tokens lost or repeated"
    assert engine_pb2.ENGINE_STATE_UNAVAILABLE not in watch.states, seen
    # seconds with no executor: the gateway's health (polled every 0.25 s) said so
    assert health_pb2.HealthCheckResponse.NOT_SERVING in watch.health, seen
    if stray != "none":
        assert strays[0].num_received == 0  # never sent a plan
        if stray == "dealer":
            assert strays[0].num_sent > 0  # it was connected and talking, and not heard
        baseline = RESTART_SECONDS.get("none")
        assert baseline is not None, "run the whole module: the undisturbed restart first"
        assert watch.seconds < 2 * baseline + 10, (watch.seconds, baseline, seen)
    new = roles(server)["executor"]
    assert len(new) == 1 and new[0] != executor
    wait_pool_whole(server)
