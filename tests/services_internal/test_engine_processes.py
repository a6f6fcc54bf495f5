"""The scheduler and executor processes, end to end over real ZeroMQ sockets.

One scheduler process (which starts its executor child) serves most tests; the tests
talk to it as a gateway does, through a DEALER and the engine_pb2 messages. Greedy
outputs are compared token for token with the in-process engine (``tessera.LLM``), the
reference. Wire conversions, flags and the scheduler loop's failure paths have fast
in-process tests at the end.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from tessera.common.cli_args import add_config_args, config_from_args, config_to_argv, env_name
from tessera.common.executor_config import ExecutorServerConfig
from tessera.common.plan import (
    CachedRequestData,
    NewRequestData,
    SamplingOptions,
    StepPlan,
    StepResult,
    StopConditions,
    TokenLogprobs,
)
from tessera.common.wire import (
    WireError,
    decode,
    encode,
    logprobs_from_pb,
    logprobs_to_pb,
    plan_from_pb,
    plan_to_pb,
    result_from_pb,
    result_to_pb,
    sampling_from_pb,
    sampling_to_pb,
    sequence_outputs,
    stop_from_pb,
    stop_to_pb,
)
from tessera.proto.tessera.v1 import engine_pb2 as pb
from tessera.scheduler.config import SchedulerServerConfig
from tests.proctable import child_pids, wait_gone

# Real processes or whole-model runs: make test-fast leaves these to make test.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"
NUM_KV_BLOCKS = 128
MAX_NUM_SEQS = 8
MAX_WAITING = 16
ENGINE_FLAGS = [
    "--model", MODEL, "--device", "cpu", "--dtype", "float32",
    "--num-kv-blocks", str(NUM_KV_BLOCKS), "--max-num-seqs", str(MAX_NUM_SEQS),
    "--max-waiting", str(MAX_WAITING),
]  # fmt: skip
READY_TIMEOUT = 120.0
# One torch thread per process: on a small shared CPU, multi-threaded torch processes
# (the reference here, the executors) spin against each other and run many times slower.
TORCH_THREADS = 1
TEXTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived",
    "List three colors:",
    "1, 2, 3, 4,",
    "Water boils at",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "In machine learning, a transformer is",
]


# -- a minimal gateway -------------------------------------------------------------


@dataclass
class Received:
    """What one request id received: tokens, how it ended, or why it was rejected."""

    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str = ""
    stop_token_id: int | None = None
    error: str = ""
    error_kind: str = ""
    num_output_tokens: int = 0
    rejection: pb.Rejection | None = None
    embedding: list[float] = field(default_factory=list)  # an embed sequence's vector

    @property
    def done(self) -> bool:
        return self.finished or self.rejection is not None


class Gateway:
    """One DEALER, protobuf both ways; records every output by request id."""

    def __init__(self, ctx: zmq.Context, address: str) -> None:
        self.socket = ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)
        self.seqs: dict[str, Received] = {}
        self.statuses: dict[int, pb.StatusReply] = {}
        self.foreign: list[str] = []  # ids this gateway never sent
        self.sent: set[str] = set()
        self._query_id = 0

    def send(self, msg: pb.GatewayMessage) -> None:
        self.socket.send(msg.SerializeToString())

    def add(self, *sequences: pb.AddSequence) -> None:
        self.sent.update(s.request_id for s in sequences)
        self.send(pb.GatewayMessage(add=pb.AddRequests(sequences=sequences)))

    def abort(self, *request_ids: str) -> None:
        self.send(pb.GatewayMessage(abort=pb.AbortRequests(request_ids=request_ids)))

    def goodbye(self) -> None:
        self.send(pb.GatewayMessage(goodbye=True))

    def status(self, timeout: float = 30.0, resend: float | None = None) -> pb.StatusReply:
        """Ask and wait; with ``resend``, ask again every so often (before it is up)."""
        deadline = time.monotonic() + timeout
        asked: list[int] = []
        while True:
            self._query_id += 1
            asked.append(self._query_id)
            self.send(pb.GatewayMessage(status=pb.StatusQuery(query_id=self._query_id)))
            until = deadline if resend is None else min(deadline, time.monotonic() + resend)
            while time.monotonic() < until:
                self.recv(until - time.monotonic())
                for query_id in asked:
                    if query_id in self.statuses:
                        return self.statuses.pop(query_id)
            if time.monotonic() >= deadline:
                raise TimeoutError("no status reply")

    def wait(self, request_ids: list[str], timeout: float = 60.0) -> dict[str, Received]:
        """Until every id finished or was rejected."""
        self.until(lambda: all(self.seq(rid).done for rid in request_ids), timeout)
        return {rid: self.seqs[rid] for rid in request_ids}

    def wait_tokens(self, request_ids: list[str], n: int, timeout: float = 60.0) -> None:
        self.until(lambda: all(len(self.seq(rid).tokens) >= n for rid in request_ids), timeout)

    def until(self, condition: Callable[[], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"gave up waiting; received so far: {self.seqs}")
            self.recv(deadline - time.monotonic())

    def seq(self, request_id: str) -> Received:
        return self.seqs.setdefault(request_id, Received())

    def recv(self, timeout: float) -> None:
        if not self.socket.poll(max(int(timeout * 1000), 1)):
            return
        out = decode(pb.EngineOutputs, self.socket.recv())
        for o in sequence_outputs(out):
            if o.request_id not in self.sent:
                self.foreign.append(o.request_id)
            seq = self.seqs.setdefault(o.request_id, Received())
            assert not seq.finished, f"{o.request_id}: output after the end"
            seq.tokens += o.new_token_ids
            seq.finished = o.finished
            seq.finish_reason = o.finish_reason
            seq.error = o.error
            seq.error_kind = o.error_kind
            seq.num_output_tokens = o.num_output_tokens
            if o.embedding:
                seq.embedding = list(o.embedding)
            seq.stop_token_id = o.stop_token_id if o.HasField("stop_token_id") else None
        for r in out.rejected:
            if r.request_id not in self.sent:
                self.foreign.append(r.request_id)
            self.seqs.setdefault(r.request_id, Received()).rejection = r
        if out.HasField("status"):
            self.statuses[out.status.query_id] = out.status

    def close(self) -> None:
        self.socket.close()


# -- processes ---------------------------------------------------------------------


@dataclass
class Engine:
    """A scheduler process (and, through it, its executor)."""

    process: subprocess.Popen
    address: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def executor_pid(self) -> int:
        children = child_pids(self.process.pid)
        assert len(children) == 1, f"scheduler children: {children}\n{self.log()}"
        return children[0]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL; and the executor too, if it outlived the scheduler."""
        executors = child_pids(self.process.pid) if self.process.poll() is None else []
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        for pid in executors:
            if not wait_gone(pid, timeout=5):
                os.kill(pid, signal.SIGKILL)


def start_engine(directory: Path, *flags: str) -> Engine:
    directory.mkdir(parents=True, exist_ok=True)
    address = f"ipc://{directory}/gateway.sock"
    log_path = directory / "engine.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-P", "-m", "tessera.scheduler", "--gateway-address", address, *flags],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": str(TORCH_THREADS)},
        )
    return Engine(process, address, log_path)


def wait_ready(engine: Engine, gateway: Gateway) -> pb.StatusReply:
    try:
        return gateway.status(timeout=READY_TIMEOUT, resend=1.0)
    except TimeoutError:
        pytest.fail(f"the engine did not come up:\n{engine.log()}")


@pytest.fixture(scope="module")
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Iterator[Engine]:
    """Started first: it loads its model while the test process loads the reference."""
    eng = start_engine(tmp_path_factory.mktemp("engine"), *ENGINE_FLAGS)
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def reference(engine):
    import torch

    from tessera import LLM

    threads = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    yield LLM(
        MODEL,
        device="cpu",
        dtype="float32",
        num_kv_blocks=NUM_KV_BLOCKS,
        max_num_seqs=MAX_NUM_SEQS,
        show_progress=False,
    )
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def info(engine, reference, ctx) -> pb.EngineInfo:
    """The engine's, once it is up (it loads while the reference does)."""
    gateway = Gateway(ctx, engine.address)
    try:
        return wait_ready(engine, gateway).info
    finally:
        gateway.close()


@pytest.fixture
def gateway(engine, ctx, info) -> Iterator[Gateway]:
    """A fresh gateway on the shared engine; the engine must be idle when it leaves."""
    gw = Gateway(ctx, engine.address)
    yield gw
    load = gw.status().load
    gw.goodbye()  # what a failed test left running ends here, not in the next test
    gw.status()  # answered after the goodbye: it has landed
    gw.close()
    assert (load.num_running, load.num_waiting) == (0, 0), engine.log()
    assert load.num_kv_blocks_free == NUM_KV_BLOCKS


def prompt_ids(reference, text: str) -> list[int]:
    return reference.get_tokenizer().encode(text)


def add_sequence(
    request_id: str, prompt: list[int], params, eos: tuple[int, ...], index: int = 0
) -> pb.AddSequence:
    """An AddSequence as a gateway builds it from the public SamplingParams (sequence
    ``index`` of n: the in-process engine offsets the seed the same way)."""
    return pb.AddSequence(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling=sampling_to_pb(params.to_options(eos, seed_offset=index)),
        stop=pb.StopConditions(
            max_tokens=params.max_tokens,
            min_tokens=params.min_tokens,
            stop_token_ids=params.stop_token_ids,
            ignore_eos=params.ignore_eos,
        ),
    )


def greedy(max_tokens: int, **kwargs):
    from tessera import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


# -- serving -------------------------------------------------------------------------


def test_scheduler_process_imports_no_torch(engine, info):
    maps = Path(f"/proc/{engine.process.pid}/maps").read_text()
    assert "libtorch" not in maps
    assert "libtorch" in Path(f"/proc/{engine.executor_pid()}/maps").read_text()
    assert info.model == MODEL and info.num_kv_blocks == NUM_KV_BLOCKS
    assert info.max_model_len == NUM_KV_BLOCKS * info.block_size  # the pool, < 8192
    assert list(info.eos_token_ids) == [2] and info.vocab_size == 49152


def test_greedy_outputs_equal_the_in_process_engine(gateway, reference, info):
    prompts = [prompt_ids(reference, t) for t in TEXTS[:4]]
    params = greedy(12)
    expected = reference.generate(prompts, params, use_tqdm=False)
    for i, prompt in enumerate(prompts):
        gateway.add(add_sequence(f"g{i}", prompt, params, tuple(info.eos_token_ids)))
    got = gateway.wait([f"g{i}" for i in range(len(prompts))])
    for i, ref in enumerate(expected):
        seq, want = got[f"g{i}"], ref.outputs[0]
        assert seq.tokens == want.token_ids
        assert seq.finish_reason == want.finish_reason
        assert seq.num_output_tokens == len(want.token_ids)


def test_sixteen_concurrent_requests_of_mixed_lengths(gateway, reference, info):
    from tessera import SamplingParams

    long_text = " ".join(TEXTS)
    all_ids = prompt_ids(reference, long_text)
    prompts, params = [], []
    for i in range(16):
        prompts.append(all_ids[: 3 + 5 * i] if i % 2 else prompt_ids(reference, TEXTS[i % 8]))
        stop_ids = [28, 198] if i % 4 == 0 else []  # "," and "\n": early in some outputs
        params.append(greedy(6 + i % 7, stop_token_ids=stop_ids))
    params[8] = SamplingParams(temperature=0.0, max_tokens=40)  # ends at EOS, token 30
    expected = reference.generate(prompts, params, use_tqdm=False)
    eos = tuple(info.eos_token_ids)
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        gateway.add(add_sequence(f"c{i}", prompt, p, eos))
    got = gateway.wait([f"c{i}" for i in range(16)])
    for i, ref in enumerate(expected):
        seq, want = got[f"c{i}"], ref.outputs[0]
        assert seq.tokens == want.token_ids, f"request {i}"
        assert seq.finish_reason == want.finish_reason, f"request {i}"
        assert seq.stop_token_id == want.stop_reason, f"request {i}"
    stops = {got[f"c{i}"].stop_token_id for i in range(16)}
    assert stops == {None, 2, 28, 198}  # length, EOS, and both stop ids ended requests


def test_abort_mid_generation_leaves_others_alone_and_frees_blocks(gateway, reference, info):
    eos = tuple(info.eos_token_ids)
    long = greedy(400, ignore_eos=True)
    short = greedy(10)
    short_prompts = [prompt_ids(reference, t) for t in TEXTS[4:6]]
    expected = reference.generate(short_prompts, short, use_tqdm=False)
    for i in range(4):
        gateway.add(add_sequence(f"long{i}", prompt_ids(reference, TEXTS[i]), long, eos))
    for i, prompt in enumerate(short_prompts):
        gateway.add(add_sequence(f"short{i}", prompt, short, eos))
    long_ids = [f"long{i}" for i in range(4)]
    got = gateway.wait(["short0", "short1"])
    for i, ref in enumerate(expected):
        assert got[f"short{i}"].tokens == ref.outputs[0].token_ids
    assert not any(gateway.seqs[r].finished for r in long_ids)
    busy = gateway.status().load
    assert busy.num_running == 4 and busy.num_kv_blocks_used > 0
    gateway.abort(*long_ids)
    load = gateway.status().load  # answered after the abort: the blocks are free already
    assert (load.num_running, load.num_kv_blocks_used) == (0, 0)
    assert load.num_kv_blocks_free == NUM_KV_BLOCKS
    for seq in gateway.wait(long_ids).values():
        assert seq.finish_reason == "abort" and seq.error == ""
        assert 1 <= len(seq.tokens) < 400


def test_n_sequences_are_admitted_whole_or_not_at_all(gateway, reference, info):
    from tessera import SamplingParams

    eos = tuple(info.eos_token_ids)
    prompt = prompt_ids(reference, TEXTS[2])
    before = gateway.status().counters
    params = SamplingParams(n=3, temperature=0.8, seed=5, max_tokens=6, ignore_eos=True)
    expected = reference.generate([prompt], params, use_tqdm=False)[0].outputs
    gateway.add(*[add_sequence(f"n{j}", prompt, params, eos, index=j) for j in range(3)])
    got = gateway.wait(["n0", "n1", "n2"])
    for j, want in enumerate(expected):  # seeded sampling equals the in-process engine
        assert got[f"n{j}"].tokens == want.token_ids and got[f"n{j}"].finish_reason == "length"
    assert got["n0"].tokens != got["n1"].tokens
    after = gateway.status().counters
    assert after.num_requests_added - before.num_requests_added == 3
    # One bad sequence rejects the whole group: nothing of it runs.
    bad = add_sequence("m2", [info.vocab_size + 7], params, eos)
    gateway.add(*[add_sequence(f"m{j}", prompt, params, eos) for j in range(2)], bad)
    got = gateway.wait(["m0", "m1", "m2"])
    for seq in got.values():
        assert seq.rejection is not None and seq.rejection.kind == "invalid"
        assert "outside the vocabulary" in seq.rejection.message and not seq.tokens
    assert gateway.status().counters.num_requests_added == after.num_requests_added


def test_waiting_queue_overflow_is_rejected_as_overloaded(gateway, reference, info):
    eos = tuple(info.eos_token_ids)
    long = greedy(400, ignore_eos=True)
    prompt = prompt_ids(reference, TEXTS[0])
    running = [f"run{i}" for i in range(MAX_NUM_SEQS)]
    gateway.add(*[add_sequence(rid, prompt, long, eos) for rid in running])
    gateway.wait_tokens(running, 1)  # every seat is taken
    waiting = [f"wait{i}" for i in range(MAX_WAITING)]
    gateway.add(*[add_sequence(rid, prompt, long, eos) for rid in waiting])
    gateway.add(add_sequence("one-too-many", prompt, long, eos))
    rejection = gateway.wait(["one-too-many"])["one-too-many"].rejection
    assert rejection is not None and rejection.kind == "overloaded"
    assert "max_waiting" in rejection.message
    load = gateway.status().load
    assert (load.num_running, load.num_waiting) == (MAX_NUM_SEQS, MAX_WAITING)
    gateway.abort(*running, *waiting)
    got = gateway.wait(running + waiting)
    assert all(s.finish_reason == "abort" for s in got.values())
    assert all(not got[rid].tokens for rid in waiting)


def test_invalid_requests_are_rejected_with_a_reason(gateway, reference, info):
    eos = tuple(info.eos_token_ids)
    params = greedy(4)
    prompt = prompt_ids(reference, TEXTS[1])
    too_long = [7] * info.max_model_len
    gateway.add(add_sequence("too-long", too_long, params, eos))
    gateway.add(add_sequence("empty", [], params, eos))
    gateway.add(*[add_sequence("twice", prompt, params, eos)] * 2)
    unset_top_p = add_sequence("top-p", prompt, params, eos)
    unset_top_p.sampling.top_p = 0.0
    gateway.add(unset_top_p)
    gateway.add(*[add_sequence(f"big{i}", prompt, params, eos) for i in range(MAX_WAITING + 1)])
    got = gateway.wait(["too-long", "empty", "twice", "top-p", "big0"])
    messages = {rid: seq.rejection.message for rid, seq in got.items() if seq.rejection}
    assert all(seq.rejection.kind == "invalid" for seq in got.values())
    assert f"max_model_len={info.max_model_len}" in messages["too-long"]
    assert "empty" in messages["empty"]
    assert "repeat" in messages["twice"]
    assert "top_p" in messages["top-p"]
    assert "max_waiting" in messages["big0"]
    # A second request under a running request's id is refused; the first runs on.
    gateway.add(add_sequence("dup", prompt, greedy(30, ignore_eos=True), eos))
    gateway.wait_tokens(["dup"], 1)
    gateway.add(add_sequence("dup", prompt, params, eos))
    gateway.until(lambda: gateway.seq("dup").rejection is not None)
    assert "has this id already" in gateway.seqs["dup"].rejection.message
    gateway.until(lambda: gateway.seq("dup").finished)
    assert len(gateway.seqs["dup"].tokens) == 30


def test_two_gateways_get_only_their_own_outputs_and_goodbye_aborts(
    engine, ctx, gateway, reference, info
):
    eos = tuple(info.eos_token_ids)
    other = Gateway(ctx, engine.address)
    try:
        short = greedy(8)
        prompts = [prompt_ids(reference, t) for t in TEXTS[6:8]]
        expected = reference.generate(prompts, short, use_tqdm=False)
        endless = greedy(400, ignore_eos=True)
        other.add(*[add_sequence(f"b{i}", prompt_ids(reference, t), endless, eos)
                    for i, t in enumerate(TEXTS[:2])])  # fmt: skip
        other.wait_tokens(["b0", "b1"], 1)
        gateway.abort("b0", "b1")  # not its requests: ignored
        for i, prompt in enumerate(prompts):
            gateway.add(add_sequence(f"a{i}", prompt, short, eos))
        got = gateway.wait(["a0", "a1"])
        for i, ref in enumerate(expected):
            assert got[f"a{i}"].tokens == ref.outputs[0].token_ids
        assert gateway.status().load.num_running == 2  # b0 and b1 run on
        aborted = gateway.status().counters.num_requests_aborted
        other.goodbye()  # on another socket: it may land after the next status query
        deadline = time.monotonic() + 10
        while (status := gateway.status()).load.num_running:
            assert time.monotonic() < deadline, "goodbye did not abort b0 and b1"
        assert status.counters.num_requests_aborted == aborted + 2
        assert gateway.foreign == [] and other.foreign == []
    finally:
        other.close()


def test_garbage_and_pickles_are_ignored_and_logged(engine, ctx, gateway, tmp_path):
    marker = tmp_path / "unpickled"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    before = gateway.status().counters.num_bad_messages
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(engine.address)
    try:
        raw.send(pickle.dumps(Exploit()))
        raw.send(pickle.dumps({"add": ["r1", [1, 2, 3]]}))
        raw.send(b"")  # parses, but says nothing
        raw.send_multipart([b"two", b"frames"])
        unknown_field = pb.GatewayMessage(goodbye=True).SerializeToString() + b"\xf8\x07\x01"
        raw.send(unknown_field)
        deadline = time.monotonic() + 10
        while gateway.status().counters.num_bad_messages < before + 5:
            assert time.monotonic() < deadline, engine.log()
            time.sleep(0.05)
    finally:
        raw.close()
    assert not marker.exists()
    assert "ignored a message from gateway" in engine.log()
    assert engine.process.poll() is None


# -- step failures, in process --------------------------------------------------------


def test_a_failing_step_fails_its_requests_and_the_executor_goes_on(reference):
    from tessera.executor.server import Executor

    executor = Executor(reference.runner, to_scheduler=None)
    bad = StepPlan(
        cached_requests=[CachedRequestData("nobody", [3])], num_scheduled_tokens={"nobody": 1}
    )
    result = executor.run_step(plan_to_pb(bad, step_id=9))
    assert result.step_id == 9 and "KeyError" in result.error
    assert executor.run_step(pb.StepPlan(step_id=0)).error  # an unreadable plan
    good = StepPlan(
        new_requests=[NewRequestData("x", [1, 2, 3], 3, SamplingOptions(temperature=0), [5])],
        num_scheduled_tokens={"x": 3},
    )
    result = executor.run_step(plan_to_pb(good, step_id=10))
    assert result.error == "" and list(result.sampled_ids) == ["x"]
    executor.run_step(plan_to_pb(StepPlan(finished_request_ids=["x"]), step_id=11))
    assert executor.info.num_kv_blocks == NUM_KV_BLOCKS


def test_scheduler_loop_fails_the_requests_of_a_failed_step(ctx):
    from tessera.scheduler.server import SchedulerServer, StepFailed
    from tests.scheduler.mirror_executor import InstantLink

    class FlakyExecutor(InstantLink):
        def __init__(self) -> None:
            super().__init__(ctx, block_size=4)
            self.steps = 0

        def poll_result(self) -> StepResult:
            self.steps += 1
            result = super().poll_result()
            if self.steps == 3:
                raise StepFailed("RuntimeError: the device fell over")
            return result

    address = f"inproc://scheduler-{id(ctx)}"
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.bind(address)
    info = pb.EngineInfo(
        model="fake", max_model_len=64, vocab_size=11, block_size=4, num_kv_blocks=32,
        eos_token_ids=[10],
    )  # fmt: skip
    config = SchedulerServerConfig(block_size=4, max_waiting=8)
    stop = threading.Event()
    executor = FlakyExecutor()
    server = SchedulerServer(config, info, executor, router, stop)
    thread = threading.Thread(target=server.serve)
    thread.start()
    gateway = Gateway(ctx, address)
    try:
        options = sampling_to_pb(SamplingOptions(temperature=0))
        gateway.add(*[
            pb.AddSequence(request_id=f"f{i}", prompt_token_ids=[1, 2, 3], sampling=options,
                           stop=pb.StopConditions(max_tokens=5, ignore_eos=True))
            for i in range(2)
        ])  # fmt: skip
        got = gateway.wait(["f0", "f1"], timeout=10)
        for seq in got.values():
            assert seq.finish_reason == "error" and "fell over" in seq.error
            assert seq.error_kind == "internal"
            assert len(seq.tokens) == 2  # steps 1 and 2 went through
        gateway.add(
            pb.AddSequence(request_id="after", prompt_token_ids=[4, 5], sampling=options,
                           stop=pb.StopConditions(max_tokens=3))
        )  # fmt: skip
        assert gateway.wait(["after"], timeout=10)["after"].finish_reason in ("stop", "length")
        status = gateway.status(timeout=10)
        assert status.counters.num_requests_failed == 2
        assert status.load.num_kv_blocks_free == 32
    finally:
        stop.set()
        thread.join(10)
        gateway.close()
        router.close()
        executor.socket.close()
    server.scheduler.check_invariants()


# -- lifecycle --------------------------------------------------------------------------


def test_an_executor_that_cannot_load_is_a_clear_error(tmp_path):
    eng = start_engine(tmp_path, "--model", str(tmp_path / "missing.gguf"), "--device", "cpu")
    try:
        assert eng.process.wait(60) == 1
    finally:
        eng.stop()
    log = eng.log()
    assert "cannot resolve model" in log
    assert "the executor" in log and "exited with code 1" in log


def test_sigkill_of_the_scheduler_takes_its_executor_down(tmp_path, ctx):
    eng = start_engine(tmp_path, "--model", "random:smollm2-135m", "--device", "cpu",
                       "--num-kv-blocks", "8")  # fmt: skip
    gateway = Gateway(ctx, eng.address)
    try:
        wait_ready(eng, gateway)
        executor_pid = eng.executor_pid()
        eng.process.kill()
        eng.process.wait(10)
        assert wait_gone(executor_pid, timeout=5), "the executor outlived its scheduler"
    finally:
        gateway.close()
        eng.stop()


def test_sigterm_stops_the_scheduler_and_its_executor(engine, ctx, reference, info):
    """Last: it stops the shared engine. Open requests end with an error saying why."""
    eos = tuple(info.eos_token_ids)
    gateway = Gateway(ctx, engine.address)
    gateway.add(add_sequence("open", prompt_ids(reference, TEXTS[0]), greedy(400), eos))
    gateway.wait_tokens(["open"], 1)
    executor_pid = engine.executor_pid()
    engine.process.send_signal(signal.SIGTERM)
    assert engine.process.wait(20) == 0, engine.log()
    assert wait_gone(executor_pid, timeout=5)
    seq = gateway.wait(["open"], timeout=5)["open"]
    gateway.close()
    assert seq.finish_reason == "error" and "shutting down" in seq.error
    assert "the executor exited with code 0" in engine.log()


# -- wire ---------------------------------------------------------------------------------

_u32 = st.integers(0, 2**32 - 1)
_ids = st.lists(_u32, max_size=6)
_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
# What users type: a few significant digits.
_decimal = st.decimals(-1000, 1000, places=3, allow_nan=False).map(float)

sampling_options = st.builds(
    SamplingOptions,
    temperature=_decimal,
    top_k=_u32,
    top_p=_decimal,
    min_p=_decimal,
    repetition_penalty=_decimal,
    presence_penalty=_decimal,
    frequency_penalty=_decimal,
    seed=st.none() | st.integers(0, 2**64 - 1),
    logprobs=st.none() | st.integers(0, 20),
    min_tokens=_u32,
    min_tokens_blocked_ids=_ids.map(tuple),
    logit_bias=st.lists(st.tuples(_u32, _decimal), max_size=4).map(tuple),
)
token_logprobs = st.builds(
    TokenLogprobs,
    token_id=_u32,
    logprob=_f32,
    rank=_u32,
    top=st.lists(st.tuples(_u32, _f32), max_size=5).map(tuple),
)
_rid = st.text(max_size=8)


@st.composite
def step_plans(draw) -> StepPlan:
    new = draw(st.lists(st.builds(NewRequestData, _rid, _ids, _u32, sampling_options, _ids, _u32),
                        max_size=3))  # fmt: skip
    cached = draw(st.lists(st.builds(CachedRequestData, _rid, _ids), max_size=3))
    scheduled = draw(st.dictionaries(_rid, _u32, max_size=5))
    return StepPlan(new, cached, scheduled, draw(st.lists(_rid, max_size=3)))


@given(sampling_options)
def test_sampling_options_round_trip(options):
    assert sampling_from_pb(sampling_to_pb(options)) == options


@given(token_logprobs)
def test_logprobs_round_trip_bit_for_bit(logprobs):
    assert logprobs_from_pb(logprobs_to_pb(logprobs)) == logprobs


@given(step_plans(), st.integers(1, 2**64 - 1))
def test_step_plans_round_trip_through_bytes(plan, step_id):
    msg = decode(pb.StepPlan, encode(plan_to_pb(plan, step_id)))
    assert msg.step_id == step_id
    back = plan_from_pb(msg)
    assert back == plan and list(back.num_scheduled_tokens) == list(plan.num_scheduled_tokens)


@given(st.dictionaries(_rid, st.tuples(_u32, st.none() | token_logprobs)), _u32)
def test_step_results_round_trip_through_bytes(sampled, step_id):
    result = StepResult(
        sampled_token_ids={rid: token for rid, (token, _) in sampled.items()},
        logprobs={rid: lp for rid, (_, lp) in sampled.items() if lp is not None},
    )
    msg = decode(pb.StepResult, encode(result_to_pb(result, step_id)))
    assert msg.step_id == step_id and result_from_pb(msg) == result


def test_plans_convert_each_sampling_object_as_its_own():
    """plan_to_pb converts a SamplingOptions object once (requests share a few), by
    identity: equal options that are not the same object keep their own message."""
    negative, positive = SamplingOptions(temperature=-0.0), SamplingOptions(temperature=0.0)
    for _ in range(2):
        plan = StepPlan(new_requests=[
            NewRequestData("a", [1], 1, negative, [0]), NewRequestData("b", [1], 1, positive, [1]),
            NewRequestData("c", [1], 1, negative, [2]),
        ])  # fmt: skip
        signs = [math.copysign(1, new.sampling.temperature)
                 for new in plan_to_pb(plan, 1).new_requests]  # fmt: skip
        assert signs == [-1, 1, -1]
        assert plan_from_pb(plan_to_pb(plan, 1)) == plan


def test_step_results_with_embeddings_round_trip_and_bad_maps_are_refused():
    result = StepResult(sampled_token_ids={"a": 5}, logprobs={"a": TokenLogprobs(5, -0.5, 1, ())},
                        embeddings={"e": [0.5, -1.25]})  # fmt: skip
    assert result_from_pb(decode(pb.StepResult, encode(result_to_pb(result, 3)))) == result
    unsampled = result_to_pb(StepResult(sampled_token_ids={"a": 5}), 3)
    unsampled.logprobs["b"].CopyFrom(logprobs_to_pb(TokenLogprobs(5, -0.5, 1, ())))
    with pytest.raises(WireError, match=r"logprobs for unsampled \['b'\]"):
        result_from_pb(unsampled)
    both = result_to_pb(StepResult(sampled_token_ids={"a": 5}), 3)
    both.embeddings["a"].values.extend([1.0])
    with pytest.raises(WireError, match=r"a token and an embedding for \['a'\]"):
        result_from_pb(both)


@given(st.integers(1, 1000), st.integers(0, 1000), st.lists(_u32, max_size=4), st.booleans())
def test_stop_conditions_round_trip_with_the_models_eos(max_tokens, min_tokens, stops, ignore):
    min_tokens = min(min_tokens, max_tokens)
    stop = StopConditions(max_tokens, min_tokens, tuple(stops), (2, 7), ignore)
    assert stop_from_pb(stop_to_pb(stop), eos_token_ids=(2, 7)) == stop
    unset = stop_to_pb(stop)
    unset.max_tokens = 0
    assert stop_from_pb(unset, (), default_max_tokens=max_tokens + 1).max_tokens == max_tokens + 1


def test_decode_accepts_only_its_own_message_type():
    plan = encode(plan_to_pb(StepPlan(num_scheduled_tokens={"a": 3}), step_id=4))
    assert decode(pb.StepPlan, plan).scheduled_ids == ["a"]
    for junk in (pickle.dumps({"step_id": 4}), pickle.dumps(StepPlan()), b"\xff" * 9, plan[:-1]):
        with pytest.raises(WireError):
            decode(pb.StepPlan, junk)
    ready = pb.ExecutorReady(info=pb.EngineInfo(model="m"), max_position_embeddings=5)
    with pytest.raises(WireError, match="does not know"):
        decode(pb.StepPlan, encode(ready))  # parses, but not as a plan's fields
    with pytest.raises(WireError):
        plan_from_pb(pb.StepPlan(scheduled_ids=["a", "b"], num_scheduled_tokens=[1]))


def test_user_floats_survive_float32_exactly():
    options = SamplingOptions(temperature=0.7, top_p=0.95, logit_bias=((3, -1.3),))
    back = sampling_from_pb(decode(pb.SamplingOptions, encode(sampling_to_pb(options))))
    assert back == options and back.temperature == 0.7
    assert math.isclose(pb.SamplingOptions(temperature=0.7).temperature, 0.7, rel_tol=1e-7)


def test_floats_near_the_largest_float32_read_back_without_overflow():
    # 3.4025e38's shorter decimals (3.403e38) round past the largest float32: skipped.
    for value in (3.4025e38, -3.4025e38, 3.4028234e38):
        wide = pb.SamplingOptions(frequency_penalty=value).frequency_penalty
        back = sampling_from_pb(pb.SamplingOptions(frequency_penalty=wide)).frequency_penalty
        assert pb.SamplingOptions(frequency_penalty=back).frequency_penalty == wide


# -- flags and environment ----------------------------------------------------------------


def _parse(argv: list[str], environ: dict[str, str]) -> SchedulerServerConfig:
    parser = argparse.ArgumentParser()
    add_config_args(parser, SchedulerServerConfig)
    return config_from_args(SchedulerServerConfig, parser.parse_args(argv), environ=environ)


def test_flags_win_over_environment_which_wins_over_defaults():
    env = {env_name("max_num_seqs"): "12", env_name("policy"): "priority"}
    config = _parse(["--max-num-seqs", "7"], env)
    assert (config.max_num_seqs, config.policy, config.block_size) == (7, "priority", 16)
    assert _parse([], {"TESSERA_MAX_MODEL_LEN": "512"}).max_model_len == 512
    unset = _parse(["--max-model-len", "none"], {"TESSERA_MAX_MODEL_LEN": "512"})
    assert unset.max_model_len is None
    with pytest.raises(ValueError, match="TESSERA_MAX_WAITING"):
        _parse([], {"TESSERA_MAX_WAITING": "many"})
    with pytest.raises(ValueError, match="max_waiting"):
        _parse(["--max-waiting", "0"], {})


def test_config_to_argv_rebuilds_the_config():
    config = ExecutorServerConfig(
        executor_address="ipc:///tmp/x.sock", dtype="float32", max_model_len=None,
        num_kv_blocks=64, gpu_memory_utilization=0.85,
    )  # fmt: skip
    parser = argparse.ArgumentParser()
    add_config_args(parser, ExecutorServerConfig)
    args = parser.parse_args(config_to_argv(config))
    assert config_from_args(ExecutorServerConfig, args, environ={"TESSERA_DTYPE": "x"}) == config
    with pytest.raises(ValueError, match="TESSERA_EXECUTOR_ADDRESS"):
        config_from_args(ExecutorServerConfig, parser.parse_args([]), environ={})


# -- one container per stage ---------------------------------------------------------


def test_an_executor_started_elsewhere_connects_and_serves(tmp_path, ctx, reference):
    """--no-start-executor: the scheduler binds, an executor started on its own (its own
    compose service) connects, and requests run exactly as with a child executor."""
    executor_address = f"ipc://{tmp_path}/executor.sock"
    engine = start_engine(
        tmp_path,
        "--no-start-executor",
        "--executor-address",
        executor_address,
        "--num-kv-blocks",
        str(NUM_KV_BLOCKS),
    )
    executor = subprocess.Popen(
        [
            sys.executable,
            "-P", "-m", "tessera.executor",
            "--executor-address",
            executor_address,
            "--model",
            MODEL,
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--num-kv-blocks",
            str(NUM_KV_BLOCKS),
        ],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": str(TORCH_THREADS)},
    )
    gateway = Gateway(ctx, engine.address)
    try:
        assert child_pids(engine.process.pid) == []  # the scheduler started nothing
        status = wait_ready(engine, gateway)
        prompt = prompt_ids(reference, TEXTS[0])
        params = greedy(8)
        gateway.add(add_sequence("x0", prompt, params, tuple(status.info.eos_token_ids)))
        got = gateway.wait(["x0"])["x0"]
        want = reference.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert got.tokens == want.token_ids
    finally:
        gateway.socket.close()
        engine.stop()
        executor.terminate()
        executor.wait(15)
