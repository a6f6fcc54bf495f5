"""Who the scheduler's executor socket hears (issue 19, defect 3): scheduler/executor_link.py
on a real ROUTER, with this process playing the executor and the stray peers, and the
executor's process faked (the link's Popen records its command line and environment).

A stray PAIR or DEALER that connects first neither holds the link nor is heard; an
executor of an earlier start is not heard either; an executor started elsewhere is the
first peer with a valid ExecutorReady, and only its own connection's drop is its loss.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from tessera.common.plan import StepPlan
from tessera.common.wire import decode, encode
from tessera.proto.tessera.v1 import engine_pb2
from tessera.scheduler import executor_link
from tessera.scheduler.config import SchedulerServerConfig
from tessera.scheduler.executor_link import LINK_TOKEN_ENV, ExecutorLink, ExecutorLost

INFO = engine_pb2.EngineInfo(model="m", max_model_len=64, vocab_size=11, block_size=4,
                             num_kv_blocks=8)  # fmt: skip
STRAY_INFO = engine_pb2.EngineInfo(model="stray", max_model_len=64, vocab_size=11,
                                   block_size=4, num_kv_blocks=999)  # fmt: skip
WAIT_S = 5.0


class FakeProcess:
    """What the link uses of a Popen; records what the executor was started with."""

    started: list[FakeProcess] = []

    def __init__(self, args: list[str], start_new_session: bool, env: dict[str, str]) -> None:
        self.args, self.env = args, env
        self.pid = 4242 + len(self.started)
        self.returncode: int | None = None
        self.started.append(self)

    def poll(self) -> int | None:
        return self.returncode

    def kill(self) -> None:
        self.returncode = -9

    terminate = kill

    def wait(self, timeout: float | None = None) -> int | None:
        return self.returncode


_peers: list[zmq.Socket] = []  # the test's own sockets, closed with its context


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    while _peers:
        _peers.pop().close()
    ctx.destroy(linger=0)


@pytest.fixture
def started(monkeypatch) -> list[FakeProcess]:
    FakeProcess.started = []
    monkeypatch.setattr(executor_link.subprocess, "Popen", FakeProcess)
    return FakeProcess.started


def make_link(ctx: zmq.Context, tmp_path: Path, start_executor: bool = True) -> ExecutorLink:
    config = SchedulerServerConfig(
        executor_address=f"ipc://{tmp_path}/executor.sock", start_executor=start_executor
    )
    return ExecutorLink(ctx, config, threading.Event())


def peer(ctx: zmq.Context, link: ExecutorLink, kind: int = zmq.DEALER,
         routing_id: str = "") -> zmq.Socket:  # fmt: skip
    socket = ctx.socket(kind)
    socket.setsockopt(zmq.LINGER, 0)
    if routing_id:
        socket.setsockopt(zmq.ROUTING_ID, routing_id.encode())
    socket.connect(link.address)
    _peers.append(socket)
    return socket


def ready(info: engine_pb2.EngineInfo = INFO) -> bytes:
    return encode(engine_pb2.ExecutorReady(info=info, max_position_embeddings=64))


def result(step_id: int, token: int) -> bytes:
    return encode(engine_pb2.StepResult(step_id=step_id, sampled_ids=["a"],
                                        sampled_token_ids=[token]))  # fmt: skip


def wait_ready(link: ExecutorLink) -> engine_pb2.EngineInfo:
    deadline = time.monotonic() + WAIT_S
    while (info := link.poll_ready()) is None:
        assert time.monotonic() < deadline, "the link did not take the executor's ready"
        link.socket.poll(50)
    return info


def wait_result(link: ExecutorLink):
    deadline = time.monotonic() + WAIT_S
    while (got := link.poll_result()) is None:
        assert time.monotonic() < deadline, "no result"
        link.socket.poll(50)
    return got


PLAN = StepPlan(num_scheduled_tokens={"a": 1})


def test_strays_connected_first_neither_hold_the_link_nor_are_heard(ctx, tmp_path, started):
    link = make_link(ctx, tmp_path)
    try:
        link.start(timeout=30)
        (process,) = started
        token = process.env[LINK_TOKEN_ENV]
        assert len(token) == 32 and not any(token in arg for arg in process.args)
        assert "--link-token" not in " ".join(process.args)
        # Right after the start, before the executor has connected: a PAIR (what held the
        # old PAIR link) and a DEALER that claims to be ready with another pool.
        stray_pair = peer(ctx, link, zmq.PAIR)
        stray_pair.send(ready(STRAY_INFO), flags=zmq.NOBLOCK)
        stray = peer(ctx, link)
        stray.send(ready(STRAY_INFO))
        time.sleep(0.2)
        assert link.poll_ready() is None
        executor = peer(ctx, link, routing_id=token)
        executor.send(ready())
        assert wait_ready(link) == INFO
        # Plans go to the executor alone; a stray's result is dropped, not taken.
        link.submit(PLAN)
        assert executor.poll(int(WAIT_S * 1000))
        assert decode(engine_pb2.StepPlan, executor.recv()).step_id == 1
        assert not stray.poll(200) and not stray_pair.poll(0)
        stray.send(result(1, 666))
        time.sleep(0.1)
        assert link.poll_result() is None
        executor.send(result(1, 7))
        assert wait_result(link).sampled_token_ids == {"a": 7}
        assert link._strays.num_dropped >= 2
        link.check_alive()
    finally:
        link.close()


def test_each_start_draws_a_token_and_the_last_executor_is_not_heard(ctx, tmp_path, started):
    link = make_link(ctx, tmp_path)
    try:
        link.start(timeout=30)
        old = peer(ctx, link, routing_id=started[0].env[LINK_TOKEN_ENV])
        old.send(ready())
        wait_ready(link)
        link.kill()
        link.start(timeout=30)
        token = started[1].env[LINK_TOKEN_ENV]
        assert token != started[0].env[LINK_TOKEN_ENV]
        old.send(ready())  # still connected, and ready again: not this start's executor
        time.sleep(0.2)
        assert link.poll_ready() is None
        new = peer(ctx, link, routing_id=token)
        new.send(ready())
        assert wait_ready(link) == INFO
        link.submit(PLAN)
        assert new.poll(int(WAIT_S * 1000)) and not old.poll(100)
    finally:
        link.close()


def test_the_other_ranks_of_a_group_get_no_token(ctx, tmp_path, started):
    config = SchedulerServerConfig(
        executor_address=f"ipc://{tmp_path}/executor.sock", tensor_parallel_size=2
    )
    link = ExecutorLink(ctx, config, threading.Event())
    try:
        link.start(timeout=30)
        rank0, rank1 = started
        assert len(rank0.env[LINK_TOKEN_ENV]) == 32 and rank1.env[LINK_TOKEN_ENV] == ""
    finally:
        link.close()


def test_an_executor_started_elsewhere_is_lost_by_its_own_drop_only(ctx, tmp_path):
    link = make_link(ctx, tmp_path, start_executor=False)
    try:
        link.start(timeout=30)
        passing = peer(ctx, link)  # connects and leaves before anyone is ready
        time.sleep(0.1)
        passing.close()
        executor = peer(ctx, link)
        executor.send(ready())
        assert wait_ready(link) == INFO
        for _ in range(3):  # strays come, speak and go: no loss, not heard
            stray = peer(ctx, link)
            stray.send(ready(STRAY_INFO))
            time.sleep(0.1)
            stray.close()
        time.sleep(0.2)
        link.check_alive()
        link.submit(PLAN)
        assert executor.poll(int(WAIT_S * 1000))
        executor.recv()
        executor.send(result(1, 7))
        assert wait_result(link).sampled_token_ids == {"a": 7}
        executor.close()
        deadline = time.monotonic() + WAIT_S
        with pytest.raises(ExecutorLost, match="connection dropped"):
            while time.monotonic() < deadline:
                link.check_alive()
                time.sleep(0.05)
    finally:
        link.close()
