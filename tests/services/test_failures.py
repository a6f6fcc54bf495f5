"""Every process of `tessera serve` dies, one at a time, under load (issue 5).

One launcher serves the whole module, in order: an undisturbed run of 16 greedy gRPC
streams gives each stream's tokens; then the executor is killed (SIGKILL) mid-stream,
killed with its restart made to fail (the executor's test hook), a tokenizer replica is
killed, a gateway hangs (SIGSTOP) and is killed, the scheduler hangs and is killed, and
last the launcher itself is killed. After each: streams went on with exactly the
undisturbed tokens, or ended with UNAVAILABLE (and a retry hint) within a bound; health
said NOT_SERVING while nothing could run; the KV pool is whole; and the process table
holds exactly the expected processes (the dead one reaped or replaced, no orphan).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
import zmq
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tessera.executor.server import FAIL_START_ENV
from tessera.proto.tessera.v1 import generate_pb2 as pb
from tessera.proto.tessera.v1 import generate_pb2_grpc as pb_grpc
from tests.proctable import child_pids, cmdline, descendants, pid_alive, wait_gone
from tests.services.launch import PROMPTS, Server
from tests.services_internal.test_engine_processes import Gateway

# Real processes or whole-model runs: make test-fast leaves these to make test.
pytestmark = pytest.mark.slow

NUM_STREAMS = 16
MAX_NUM_SEQS = 16
SCHEDULER_TIMEOUT = 3.0  # the gateway's: a silent scheduler fails its streams after this
HEARTBEAT_TIMEOUT = 3.0  # the scheduler's, for this gateway: a silent gateway's requests end
UNAVAILABLE_WITHIN = 10.0  # seconds from a failure to the end of every open stream
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory) -> Path:
    """While this file exists, executors fail at start-up (the test hook)."""
    return tmp_path_factory.mktemp("hook") / "fail-start"


@pytest.fixture(scope="module")
def server(tmp_path_factory, sentinel) -> Iterator[Server]:
    env = {
        FAIL_START_ENV: str(sentinel),
        "TESSERA_SCHEDULER_TIMEOUT": str(SCHEDULER_TIMEOUT),
        "TESSERA_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
    }
    s = Server(tmp_path_factory.mktemp("failures"), env=env, max_num_seqs=MAX_NUM_SEQS)
    yield s
    s.stop()  # the last test kills the launcher; this cleans up after a failed test


# -- streams ------------------------------------------------------------------------------


def request(i: int, max_tokens: int | None = None) -> pb.GenerateRequest:
    sampling = pb.SamplingParameters(
        temperature=0.0, max_tokens=max_tokens or 24 + i % 5, ignore_eos=True
    )
    return pb.GenerateRequest(text=PROMPTS[i % len(PROMPTS)] + " " * (i // 8), sampling=sampling)


@dataclass
class Outcome:
    tokens: list[int] = field(default_factory=list)
    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""
    retry_after_ms: str | None = None
    ended_at: float = 0.0


async def _one(stub, req: pb.GenerateRequest, out: Outcome) -> None:
    call = stub.Generate(req)
    try:
        async for msg in call:
            out.tokens.extend(msg.token_ids)
    except grpc.aio.AioRpcError as e:
        out.code, out.details = e.code(), e.details() or ""
        out.retry_after_ms = dict(e.trailing_metadata() or ()).get("retry-after-ms")
    out.ended_at = time.monotonic()


def run_streams(
    server: Server,
    requests: list[pb.GenerateRequest],
    disturb: Callable[[], None] | None = None,
    after_tokens: int = 2,
) -> tuple[list[Outcome], float]:
    """Run the streams; once each has ``after_tokens`` tokens (none finished), call
    ``disturb``. Returns the outcomes and when ``disturb`` ran."""
    outs = [Outcome() for _ in requests]
    disturbed_at = 0.0

    async def main() -> None:
        nonlocal disturbed_at
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.TesseraStub(ch)
            pairs = zip(requests, outs, strict=True)
            tasks = [asyncio.create_task(_one(stub, r, o)) for r, o in pairs]
            if disturb is not None:
                deadline = time.monotonic() + 120
                while not all(len(o.tokens) >= after_tokens for o in outs):
                    assert time.monotonic() < deadline, "the streams did not start"
                    assert not any(t.done() for t in tasks), "a stream ended too early"
                    await asyncio.sleep(0.02)
                disturb()
                disturbed_at = time.monotonic()
            await asyncio.gather(*tasks)

    asyncio.run(main())
    return outs, disturbed_at


def assert_all_unavailable(outs: list[Outcome], since: float, expected=None) -> None:
    for i, out in enumerate(outs):
        assert out.code == grpc.StatusCode.UNAVAILABLE, (i, out.code, out.details)
        assert out.retry_after_ms is not None and int(out.retry_after_ms) > 0
        assert out.ended_at - since < UNAVAILABLE_WITHIN, f"stream {i} ended too late"
        if expected is not None:  # what was streamed before is valid
            assert out.tokens == expected[i][: len(out.tokens)], f"stream {i}"


# -- the server's state ---------------------------------------------------------------------


def health(server: Server) -> int:
    with grpc.insecure_channel(server.target) as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            ).status
        except grpc.RpcError:
            return -1  # no gateway answers


def wait_health(server: Server, status: int, timeout: float) -> float:
    """Seconds until health says ``status``."""
    start = time.monotonic()
    while health(server) != status:
        assert time.monotonic() - start < timeout, f"health is not {status} after {timeout}s"
        time.sleep(0.1)
    return time.monotonic() - start


def wait_pool_whole(server: Server, timeout: float = 15.0) -> pb.Load:
    stub = server.stub()
    deadline = time.monotonic() + timeout
    while True:
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
        load = stub.GetLoad(pb.GetLoadRequest(), timeout=5)
        if load.num_kv_blocks_free == info.num_kv_blocks or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (load.num_running, load.num_waiting, load.num_kv_blocks_used) == (0, 0, 0)
    assert load.num_kv_blocks_free == info.num_kv_blocks
    return load


def roles(server: Server) -> dict[str, list[int]]:
    """The launcher's live descendants by role (a zombie would be missing here)."""
    found: dict[str, list[int]] = {}
    for pid in descendants(server.proc.pid):
        line = cmdline(pid)
        names = ("tokenizer_svc", "scheduler", "executor", "services")
        role = next((r for r in names if f"-m tessera.{r} " in line + " "), line)
        found.setdefault(role, []).append(pid)
    return {role: sorted(pids) for role, pids in found.items()}


def assert_process_table_whole(server: Server, timeout: float = 30.0) -> dict[str, list[int]]:
    """Exactly 2 tokenizers, a scheduler with one executor child, and a gateway: all alive,
    children of the launcher (the executor of the scheduler), nothing else."""
    deadline = time.monotonic() + timeout
    while True:
        table = roles(server)
        counts = {role: len(pids) for role, pids in table.items()}
        everyone = [pid for pids in table.values() for pid in pids]
        ok = counts == {"tokenizer_svc": 2, "scheduler": 1, "executor": 1, "services": 1}
        if ok and all(pid_alive(p) for p in everyone):
            break
        assert time.monotonic() < deadline, f"process table: {table}"
        time.sleep(0.2)
    assert child_pids(table["scheduler"][0]) == table["executor"]
    assert sorted(child_pids(server.proc.pid)) == sorted(
        table["tokenizer_svc"] + table["scheduler"] + table["services"]
    )
    return table


def generate_ok(server: Server, unavailable_for: float = 0.0) -> None:
    """A short request completes. ``unavailable_for``: for that long, an UNAVAILABLE answer
    is retried, as a client does (health is polled by the gateway and may still read
    SERVING in the moment between a scheduler's loss and the gateway noticing it)."""
    deadline = time.monotonic() + unavailable_for
    while True:
        try:
            stream = server.stub().Generate(request(0, 3), timeout=60)
            ids = [t for m in stream for t in m.token_ids]
            break
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert len(ids) == 3


# -- the tests, in order --------------------------------------------------------------------


@pytest.fixture(scope="module")
def expected(server) -> list[list[int]]:
    outs, _ = run_streams(server, [request(i) for i in range(NUM_STREAMS)])
    for i, out in enumerate(outs):
        assert out.code == grpc.StatusCode.OK and len(out.tokens) == 24 + i % 5, out.details
    return [out.tokens for out in outs]


def test_executor_sigkill_mid_generation_loses_and_repeats_no_token(server, expected):
    before = assert_process_table_whole(server)
    executor = before["executor"][0]
    outs, _ = run_streams(
        server, [request(i) for i in range(NUM_STREAMS)], lambda: os.kill(executor, signal.SIGKILL)
    )
    for i, out in enumerate(outs):
        assert out.code == grpc.StatusCode.OK, out.details
        assert out.tokens == expected[i], f"stream {i}: tokens lost or repeated"
    assert wait_gone(executor, 5) and not Path(f"/proc/{executor}").exists()  # reaped
    after = assert_process_table_whole(server)
    assert after["executor"] != before["executor"]
    assert {k: v for k, v in after.items() if k != "executor"} == {
        k: v for k, v in before.items() if k != "executor"
    }
    wait_pool_whole(server)


def test_a_failed_executor_restart_ends_every_stream_unavailable_then_recovers(
    server, expected, sentinel
):
    executor = roles(server)["executor"][0]

    def kill_with_failing_restarts() -> None:
        sentinel.touch()
        os.kill(executor, signal.SIGKILL)

    outs, killed = run_streams(
        server, [request(i) for i in range(NUM_STREAMS)], kill_with_failing_restarts
    )
    assert_all_unavailable(outs, killed, expected)
    assert all("exited with code 1" in out.details for out in outs), outs[0].details
    assert wait_health(server, NOT_SERVING, 5) < 5
    # New requests fail fast, on both APIs, with a retry hint.
    asked = time.monotonic()
    (out,), _ = run_streams(server, [request(0)])
    assert out.code == grpc.StatusCode.UNAVAILABLE and out.retry_after_ms is not None
    assert time.monotonic() - asked < 1.0
    r = httpx.post(f"{server.http_url}/v1/completions", timeout=10,
                   json={"model": "smollm2-135m-instruct", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 503 and r.headers["Retry-After"]
    assert httpx.get(f"{server.http_url}/health", timeout=10).status_code == 503
    assert wait_gone(executor, 5)
    # Once executors can start again, a retry (with backoff) brings the engine back.
    sentinel.unlink()
    wait_health(server, SERVING, 60)
    generate_ok(server)
    wait_pool_whole(server)
    assert_process_table_whole(server)


def test_a_killed_tokenizer_replica_is_skipped_and_restarted(server):
    before = assert_process_table_whole(server)
    victim = before["tokenizer_svc"][0]
    os.kill(victim, signal.SIGKILL)
    for _ in range(6):
        generate_ok(server)
    assert wait_gone(victim, 5) and not Path(f"/proc/{victim}").exists()
    after = assert_process_table_whole(server)
    assert victim not in after["tokenizer_svc"] and before["tokenizer_svc"][1] in after[
        "tokenizer_svc"
    ]
    wait_pool_whole(server)


def test_a_hung_then_killed_gateway_has_its_requests_aborted_and_is_replaced(server):
    """More streams than seats: the gateway's requests run and wait when it hangs. The
    scheduler hears no heartbeat and aborts them all (blocks free); once killed, the
    launcher starts a new gateway."""
    gateway = roles(server)["services"][0]
    ctx = zmq.Context()
    watcher = Gateway(ctx, f"ipc://{server.run_dir}/scheduler.sock")  # the scheduler's view
    stopped = 0.0
    try:

        def hang() -> None:
            nonlocal stopped
            os.kill(gateway, signal.SIGSTOP)
            stopped = time.monotonic()

        async def main() -> None:
            async with grpc.aio.insecure_channel(server.target) as ch:
                stub = pb_grpc.TesseraStub(ch)
                reqs = [request(i, max_tokens=500) for i in range(MAX_NUM_SEQS + 4)]
                outs = [Outcome() for _ in reqs]
                pairs = zip(reqs, outs, strict=True)
                tasks = [asyncio.create_task(_one(stub, r, o)) for r, o in pairs]
                while sum(len(o.tokens) > 0 for o in outs) < MAX_NUM_SEQS:
                    await asyncio.sleep(0.05)
                load = watcher.status().load
                assert (load.num_running, load.num_waiting) == (MAX_NUM_SEQS, 4)
                hang()
                # The scheduler's view, while the gateway is frozen.
                deadline = time.monotonic() + HEARTBEAT_TIMEOUT + 5
                while (load := watcher.status().load).num_kv_blocks_used:
                    assert time.monotonic() < deadline, f"blocks still used: {load}"
                    await asyncio.sleep(0.2)
                assert (load.num_running, load.num_waiting) == (0, 0)
                assert time.monotonic() - stopped > HEARTBEAT_TIMEOUT - 0.5
                os.kill(gateway, signal.SIGKILL)
                os.kill(gateway, signal.SIGCONT)
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run(main())
    finally:
        watcher.close()
        ctx.destroy(linger=0)
    assert wait_gone(gateway, 10)
    wait_health(server, SERVING, 60)
    after = assert_process_table_whole(server)
    assert after["services"] != [gateway]
    generate_ok(server)
    wait_pool_whole(server)


def test_a_hung_scheduler_fails_open_streams_unavailable_and_health_not_serving(server):
    scheduler = roles(server)["scheduler"][0]
    try:
        outs, stopped = run_streams(
            server,
            [request(i, max_tokens=500) for i in range(4)],
            lambda: os.kill(scheduler, signal.SIGSTOP),
        )
        assert_all_unavailable(outs, stopped)
        assert all(out.ended_at - stopped > SCHEDULER_TIMEOUT - 0.5 for out in outs)
        assert "sent nothing" in outs[0].details
        wait_health(server, NOT_SERVING, 3)
        asked = time.monotonic()
        (out,), _ = run_streams(server, [request(0)])
        assert out.code == grpc.StatusCode.UNAVAILABLE and time.monotonic() - asked < 1.0
    finally:
        os.kill(scheduler, signal.SIGCONT)
    wait_health(server, SERVING, 10)
    wait_pool_whole(server)  # the gateway aborted what it had failed meanwhile
    generate_ok(server)
    assert roles(server)["scheduler"] == [scheduler]


def test_a_killed_scheduler_takes_its_executor_down_and_is_replaced(server):
    before = assert_process_table_whole(server)
    scheduler, executor = before["scheduler"][0], before["executor"][0]
    outs, killed = run_streams(
        server,
        [request(i, max_tokens=500) for i in range(4)],
        lambda: os.kill(scheduler, signal.SIGKILL),
    )
    assert_all_unavailable(outs, killed)
    assert wait_gone(executor, 5), "the executor outlived its scheduler"
    assert wait_gone(scheduler, 5) and not Path(f"/proc/{scheduler}").exists()
    # The new scheduler and its executor are up in a few seconds; when the new process
    # answers before the gateway's --scheduler-timeout, the gateway learns of the loss
    # and of the replacement at once, and health may never show NOT_SERVING. What must
    # hold: the old streams ended UNAVAILABLE (above), and the new process serves. Health
    # is the gateway's poll of its link (every 0.25 s), so a request sent as the old
    # streams end may still be refused UNAVAILABLE: it is retried, as clients do.
    wait_health(server, SERVING, 90)
    after = assert_process_table_whole(server)
    assert after["services"] == before["services"]
    assert after["tokenizer_svc"] == before["tokenizer_svc"]
    generate_ok(server, unavailable_for=60)
    wait_health(server, SERVING, 30)
    wait_pool_whole(server)


def test_sigkill_of_the_launcher_leaves_no_process(server):
    """Last: it ends the module's server."""
    everyone = [pid for pids in assert_process_table_whole(server).values() for pid in pids]
    outs: list[Outcome] = []

    def kill_launcher() -> None:
        server.proc.kill()

    outs, killed = run_streams(server, [request(0, max_tokens=500)], kill_launcher)
    assert outs[0].code == grpc.StatusCode.UNAVAILABLE, outs[0].details
    server.proc.wait(5)
    deadline = time.monotonic() + 15
    while [p for p in everyone if pid_alive(p)]:
        assert time.monotonic() < deadline, [cmdline(p) for p in everyone if pid_alive(p)]
        time.sleep(0.1)
