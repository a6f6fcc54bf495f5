"""An executor that dies or hangs, over real processes and sockets.

One engine (a scheduler and its executor child) serves the process tests in order: an
undisturbed run gives each sequence's greedy tokens, then the executor is killed
(SIGKILL), hung (SIGSTOP, caught by the step watchdog), and killed with its restart made
to fail (the executor's test hook). Streams must go on with exactly the undisturbed
tokens, or end with the "unavailable" contract of engine.proto, and no process may be
left behind. The internal sockets must reject pickles and go on serving: the scheduler's
side of the executor socket is tested with a fake executor in this process (which also
drops its connection, as an executor started elsewhere would when it dies), the
executor's side with a real executor and a fake scheduler.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from tessera.common.plan import NewRequestData, SamplingOptions, StepPlan
from tessera.common.wire import (
    decode,
    encode,
    plan_from_pb,
    plan_to_pb,
    result_to_pb,
    sampling_to_pb,
)
from tessera.executor.server import FAIL_START_ENV
from tessera.proto.tessera.v1 import engine_pb2 as pb
from tests.proctable import child_pids, descendants, pid_alive, wait_gone
from tests.scheduler.mirror_executor import MirrorExecutor, sample_from_context
from tests.services_internal.test_engine_processes import Engine, Gateway, Received

# Real processes or whole-model runs: make test-fast leaves these to make test.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MODEL = "random:smollm2-135m"  # deterministic weights; greedy needs nothing more
NUM_SEQS = 16
STEP_TIMEOUT = 5.0  # the watchdog: a hung step is caught after this long
ENGINE_FLAGS = [
    "--model", MODEL, "--device", "cpu", "--dtype", "float32", "--num-kv-blocks", "64",
    "--max-num-seqs", str(NUM_SEQS), "--max-waiting", "64",
    # Short steps (chunked prefill), so that the watchdog never mistakes one for a hang.
    "--max-num-batched-tokens", "64", "--step-timeout", str(STEP_TIMEOUT),
]  # fmt: skip
READY_TIMEOUT = 120.0
UNAVAILABLE_WITHIN = 10.0  # seconds from the kill to every stream's end


# -- the engine ----------------------------------------------------------------------


def start_engine(directory: Path, *flags: str, env: dict[str, str] | None = None) -> Engine:
    directory.mkdir(parents=True, exist_ok=True)
    address = f"ipc://{directory}/gateway.sock"
    log_path = directory / "engine.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-P", "-m", "tessera.scheduler", "--gateway-address", address, *flags],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        )
    return Engine(process, address, log_path)


@pytest.fixture(scope="module")
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory) -> Path:
    """While this file exists, executors fail at start-up (the test hook)."""
    return tmp_path_factory.mktemp("hook") / "fail-start"


@pytest.fixture(scope="module")
def engine(tmp_path_factory, sentinel) -> Iterator[Engine]:
    eng = start_engine(
        tmp_path_factory.mktemp("engine"), *ENGINE_FLAGS, env={FAIL_START_ENV: str(sentinel)}
    )
    yield eng
    if eng.process.poll() is None:  # the last test kills it, unless a test failed first
        everyone = descendants(eng.process.pid)
        eng.stop()
        assert eng.process.returncode == 0, eng.log()
        assert not [pid for pid in everyone if pid_alive(pid)], "processes left behind"


@pytest.fixture(scope="module")
def gateway(engine, ctx) -> Iterator[Gateway]:
    gw = Gateway(ctx, engine.address)
    try:
        gw.status(timeout=READY_TIMEOUT, resend=1.0)
    except TimeoutError:
        pytest.fail(f"the engine did not come up:\n{engine.log()}")
    yield gw
    gw.close()


def sequences(prefix: str) -> list[pb.AddSequence]:
    """NUM_SEQS greedy sequences of different prompts and lengths."""
    greedy = sampling_to_pb(SamplingOptions(temperature=0.0))
    return [
        pb.AddSequence(
            request_id=f"{prefix}{i}",
            prompt_token_ids=[(31 * i + 7 * j) % 4000 + 100 for j in range(3 + i % 6)],
            sampling=greedy,
            stop=pb.StopConditions(max_tokens=14 + i % 5, ignore_eos=True),
        )
        for i in range(NUM_SEQS)
    ]


def run(gateway: Gateway, prefix: str, timeout: float = 120.0) -> dict[int, Received]:
    gateway.add(*sequences(prefix))
    got = gateway.wait([f"{prefix}{i}" for i in range(NUM_SEQS)], timeout=timeout)
    return {i: got[f"{prefix}{i}"] for i in range(NUM_SEQS)}


@pytest.fixture(scope="module")
def expected(gateway) -> dict[int, list[int]]:
    """Each sequence's greedy tokens, from a run nothing disturbed."""
    got = run(gateway, "ref")
    for i, seq in got.items():
        assert seq.finish_reason == "length" and len(seq.tokens) == 14 + i % 5
    return {i: seq.tokens for i, seq in got.items()}


def start_mid_generation(gateway: Gateway, prefix: str) -> list[str]:
    """Admit the sequences and return once every one has streamed a token, none all."""
    gateway.add(*sequences(prefix))
    ids = [f"{prefix}{i}" for i in range(NUM_SEQS)]
    gateway.wait_tokens(ids, 2)
    assert not any(gateway.seqs[rid].finished for rid in ids)
    return ids


def assert_streams_equal(gateway: Gateway, ids: list[str], expected) -> None:
    for i, rid in enumerate(ids):
        seq = gateway.seqs[rid]
        assert seq.finish_reason == "length" and seq.error == "", rid
        assert seq.tokens == expected[i], f"{rid}: tokens lost or repeated"
        assert seq.num_output_tokens == len(expected[i])


def wait_status(
    gateway: Gateway, condition: Callable[[pb.StatusReply], bool], timeout: float
) -> pb.StatusReply:
    """The first status reply that meets the condition (asked every 0.1 s)."""
    deadline = time.monotonic() + timeout
    while not condition(status := gateway.status(timeout=5)):
        assert time.monotonic() < deadline, f"no such status; the last: {status}"
        time.sleep(0.1)
    return status


def assert_replaced(engine: Engine, old_pid: int) -> None:
    """The old executor is gone (reaped, not a zombie) and one new child serves."""
    assert wait_gone(old_pid, timeout=5) and not Path(f"/proc/{old_pid}").exists()
    children = child_pids(engine.process.pid)
    assert len(children) == 1 and children[0] != old_pid, children


# -- the process tests, in order ------------------------------------------------------


def test_sigkill_mid_generation_loses_and_repeats_no_token(engine, gateway, expected):
    ids = start_mid_generation(gateway, "kill")
    old_pid = engine.executor_pid()
    os.kill(old_pid, signal.SIGKILL)
    gateway.wait(ids, timeout=60)
    assert_streams_equal(gateway, ids, expected)
    assert_replaced(engine, old_pid)
    status = gateway.status()
    assert status.state == pb.ENGINE_STATE_SERVING and status.state_reason == ""
    assert status.counters.num_executor_restarts == 1
    assert status.load.num_kv_blocks_free == 64
    assert "exited with code -9" in engine.log()


def test_a_hung_executor_is_killed_by_the_watchdog_and_replaced(engine, gateway, expected):
    ids = start_mid_generation(gateway, "hang")
    old_pid = engine.executor_pid()
    os.kill(old_pid, signal.SIGSTOP)
    stopped = time.monotonic()
    status = wait_status(gateway, lambda s: s.counters.num_executor_restarts == 2, 30)
    assert time.monotonic() - stopped < STEP_TIMEOUT + 2
    assert status.state == pb.ENGINE_STATE_RECOVERING and "hung" in status.state_reason
    gateway.wait(ids, timeout=60)
    assert_streams_equal(gateway, ids, expected)
    assert_replaced(engine, old_pid)
    assert f"ran longer than step_timeout={STEP_TIMEOUT:g}s" in engine.log()


def test_a_failed_restart_ends_every_stream_as_unavailable_then_recovers(
    engine, gateway, expected, sentinel
):
    ids = start_mid_generation(gateway, "fail")
    sentinel.touch()  # the next executors exit at start-up
    old_pid = engine.executor_pid()
    os.kill(old_pid, signal.SIGKILL)
    killed = time.monotonic()
    gateway.wait(ids, timeout=UNAVAILABLE_WITHIN)
    assert time.monotonic() - killed < UNAVAILABLE_WITHIN
    for i, rid in enumerate(ids):
        seq = gateway.seqs[rid]
        assert (seq.finish_reason, seq.error_kind) == ("error", "unavailable"), rid
        assert "unavailable" in seq.error and "exited with code 1" in seq.error
        assert seq.tokens == expected[i][: len(seq.tokens)], f"{rid}: wrong tokens streamed"
    status = gateway.status()
    assert status.state == pb.ENGINE_STATE_UNAVAILABLE and "next attempt" in status.state_reason
    assert status.load.num_running + status.load.num_waiting == 0
    asked = time.monotonic()
    gateway.add(*sequences("refused")[:2])
    got = gateway.wait(["refused0", "refused1"], timeout=5)
    assert time.monotonic() - asked < 1.0, "a new request did not fail fast"
    for seq in got.values():
        assert seq.rejection is not None and seq.rejection.kind == "unavailable"
    assert wait_gone(old_pid, timeout=5)
    # Once executors can start again, a retry (with backoff) brings the engine back.
    sentinel.unlink()
    status = wait_status(gateway, lambda s: s.state == pb.ENGINE_STATE_SERVING, 60)
    assert status.state_reason == "" and len(child_pids(engine.process.pid)) == 1
    got = run(gateway, "back", timeout=60)
    assert {i: seq.tokens for i, seq in got.items()} == expected


def embed_sequences(prefix: str, count: int = 4) -> list[pb.AddSequence]:
    """Embed sequences of 300 tokens: several prefill chunks each (ENGINE_FLAGS' budget)."""
    return [
        pb.AddSequence(request_id=f"{prefix}{i}", embed=True,
                       prompt_token_ids=[(13 * i + 5 * j) % 4000 + 100 for j in range(300)])
        for i in range(count)
    ]  # fmt: skip


def test_sigkill_mid_embedding_recomputes_the_prompt(engine, gateway, expected):
    """Embed sequences whose prompts are part computed when the executor dies are run
    again from their first token by the next one: the same vectors as undisturbed (the
    running sum does not carry over), beside streams that lose no token."""
    gateway.add(*embed_sequences("embref"))
    ids = [f"embref{i}" for i in range(4)]
    reference = {rid[len("embref"):]: seq.embedding
                 for rid, seq in gateway.wait(ids, timeout=120).items()}  # fmt: skip
    assert all(len(v) == 576 for v in reference.values())
    gen_ids = start_mid_generation(gateway, "embgen")
    gateway.add(*embed_sequences("embkill"))
    gateway.until(lambda: gateway.seq("embkill0").finished, timeout=60)
    assert not gateway.seq("embkill3").finished, "the embeddings were meant to be mid-way"
    old_pid = engine.executor_pid()
    os.kill(old_pid, signal.SIGKILL)
    got = gateway.wait([f"embkill{i}" for i in range(4)], timeout=120)
    for rid, seq in got.items():
        assert seq.finish_reason == "stop" and seq.error == "" and seq.tokens == [], rid
        want = reference[rid[len("embkill"):]]
        error = sum((a - b) ** 2 for a, b in zip(seq.embedding, want, strict=True)) ** 0.5
        assert error <= 1e-5 * sum(b * b for b in want) ** 0.5, f"{rid}: {error}"
    gateway.wait(gen_ids, timeout=60)
    assert_streams_equal(gateway, gen_ids, expected)
    assert_replaced(engine, old_pid)
    assert wait_status(gateway, lambda s: s.load.num_kv_blocks_free == 64, 10)


def test_sigkill_of_the_scheduler_takes_a_restarted_executor_down(engine, gateway):
    """Last of the engine's tests. Each executor, the first or a replacement, dies with
    the scheduler that started it."""
    assert gateway.status().counters.num_executor_restarts >= 3
    executor_pid = engine.executor_pid()
    engine.process.kill()
    engine.process.wait(10)
    assert wait_gone(executor_pid, timeout=5), "the executor outlived its scheduler"


# -- an executor started elsewhere, faked in this process -----------------------------

FAKE_INFO = pb.EngineInfo(model="fake", max_model_len=64, vocab_size=11, block_size=4,
                          num_kv_blocks=32, eos_token_ids=[10])  # fmt: skip


class FakeExecutor(threading.Thread):
    """Connects like ``python -m tessera.executor --executor-address``, then runs plans by the
    mirror rule (tokens from tests/scheduler/mirror_executor.py). It can misbehave: a
    pickle before its ExecutorReady, a pickle for the result of step ``pickle_at``, or
    vanish (close its socket unanswered) at step ``vanish_at``."""

    def __init__(
        self,
        ctx: zmq.Context,
        address: str,
        pickle_first: bool = False,
        pickle_at: int = 0,
        vanish_at: int = 0,
    ) -> None:
        super().__init__(daemon=True)
        self.ctx, self.address = ctx, address
        self.pickle_first, self.pickle_at, self.vanish_at = pickle_first, pickle_at, vanish_at
        self.finish = threading.Event()
        self.num_steps = 0

    def run(self) -> None:
        socket = self.ctx.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self.address)
        try:
            if self.pickle_first:
                socket.send(pickle.dumps({"info": {"num_kv_blocks": 32}}))
            socket.send(encode(pb.ExecutorReady(info=FAKE_INFO, max_position_embeddings=64)))
            mirror = MirrorExecutor(block_size=FAKE_INFO.block_size)
            while not self.finish.is_set():
                if not socket.poll(20):
                    continue
                msg = decode(pb.StepPlan, socket.recv())
                self.num_steps += 1
                result = mirror.execute(plan_from_pb(msg))
                if self.num_steps == self.vanish_at:
                    return  # dies mid-step: the connection drops, no result
                if self.num_steps == self.pickle_at:
                    socket.send(pickle.dumps(result))
                else:
                    socket.send(encode(result_to_pb(result, msg.step_id)))
        finally:
            socket.close()

    def stop(self) -> None:
        self.finish.set()
        self.join(5)


def fake_sequence(request_id: str, prompt: list[int], max_tokens: int) -> pb.AddSequence:
    return pb.AddSequence(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling=sampling_to_pb(SamplingOptions(temperature=0.0)),
        stop=pb.StopConditions(max_tokens=max_tokens, ignore_eos=True),
    )


def fake_tokens(prompt: list[int], max_tokens: int) -> list[int]:
    """What the fake executor streams for a sequence, whatever else runs."""
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(sample_from_context("", tokens))
    return tokens[len(prompt) :]


@pytest.fixture
def external(tmp_path, ctx) -> Iterator[tuple[Engine, Gateway, str]]:
    """A scheduler that waits for an executor started elsewhere, and its gateway."""
    executor_address = f"ipc://{tmp_path}/executor.sock"
    eng = start_engine(tmp_path, "--no-start-executor", "--executor-address", executor_address,
                       "--block-size", "4", "--step-timeout", "30")  # fmt: skip
    gw = Gateway(ctx, eng.address)
    yield eng, gw, executor_address
    gw.close()
    eng.stop()
    assert eng.process.returncode == 0, eng.log()


def test_pickles_on_the_schedulers_executor_socket_are_rejected_and_logged(external, ctx):
    engine, gateway, executor_address = external
    fake = FakeExecutor(ctx, executor_address, pickle_first=True, pickle_at=2)
    fake.start()
    try:
        gateway.status(timeout=30, resend=0.5)  # up: the pickle did not stop it
        assert "ignored a message from the executor (not ExecutorReady)" in engine.log()
        gateway.add(fake_sequence("p0", [1, 2, 3], 6))
        seq = gateway.wait(["p0"], timeout=10)["p0"]
        assert (seq.finish_reason, seq.error_kind) == ("error", "internal")
        assert "unreadable step result" in seq.error and seq.tokens == fake_tokens([1, 2, 3], 1)
        gateway.add(fake_sequence("p1", [4, 5], 6))  # it goes on serving
        assert gateway.wait(["p1"], timeout=10)["p1"].tokens == fake_tokens([4, 5], 6)
        assert "unreadable step result" in engine.log()
        assert gateway.status().state == pb.ENGINE_STATE_SERVING
    finally:
        fake.stop()


def test_an_outside_executor_that_vanishes_is_replaced_by_the_next_one(external, ctx):
    engine, gateway, executor_address = external
    first = FakeExecutor(ctx, executor_address, vanish_at=4)
    first.start()
    gateway.status(timeout=30, resend=0.5)
    prompts = {f"v{i}": [1 + i, 2, 3 + i] for i in range(4)}
    gateway.add(*[fake_sequence(rid, prompt, 10) for rid, prompt in prompts.items()])
    first.join(10)  # it vanished at step 4
    status = wait_status(gateway, lambda s: s.state == pb.ENGINE_STATE_RECOVERING, 10)
    assert "connection dropped" in status.state_reason
    second = FakeExecutor(ctx, executor_address)
    second.start()
    try:
        got = gateway.wait(list(prompts), timeout=20)
        for rid, prompt in prompts.items():
            assert got[rid].tokens == fake_tokens(prompt, 10), rid
        status = gateway.status()
        assert status.state == pb.ENGINE_STATE_SERVING
        assert status.counters.num_executor_restarts == 1
    finally:
        second.stop()


# -- the executor's socket, with this process as its scheduler -------------------------


def test_pickles_on_the_executors_socket_are_rejected_and_logged(tmp_path, ctx):
    address = f"ipc://{tmp_path}/executor.sock"
    to_executor = ctx.socket(zmq.DEALER)
    to_executor.setsockopt(zmq.LINGER, 0)
    to_executor.bind(address)
    log_path = tmp_path / "executor.log"
    with open(log_path, "wb") as log:
        executor = subprocess.Popen(
            [sys.executable, "-P", "-m", "tessera.executor", "--executor-address", address,
             "--model", MODEL, "--device", "cpu", "--num-kv-blocks", "8"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip

    def ask(*frames: bytes) -> pb.StepResult:
        to_executor.send_multipart(list(frames))
        assert to_executor.poll(30_000), log_path.read_text()
        return decode(pb.StepResult, to_executor.recv())

    try:
        assert to_executor.poll(READY_TIMEOUT * 1000), log_path.read_text()
        decode(pb.ExecutorReady, to_executor.recv())
        plan = StepPlan(num_scheduled_tokens={"a": 3})
        for junk in [(pickle.dumps(plan),), (pickle.dumps({"step_id": 1}),),
                     (encode(plan_to_pb(plan, 1)), b"a second frame")]:  # fmt: skip
            result = ask(*junk)
            assert result.step_id == 0 and "could not read the plan" in result.error
        # It goes on serving: a real plan runs.
        good = plan_to_pb(
            StepPlan(
                new_requests=[
                    NewRequestData("a", [5, 6, 7], 3, SamplingOptions(temperature=0), [0])
                ],
                num_scheduled_tokens={"a": 3},
            ),
            step_id=1,
        )
        result = ask(encode(good))
        assert result.step_id == 1 and result.error == "" and list(result.sampled_ids) == ["a"]
        assert executor.poll() is None
        assert log_path.read_text().count("unreadable step plan") == 3
    finally:
        executor.terminate()
        assert executor.wait(15) == 0
        to_executor.close()
