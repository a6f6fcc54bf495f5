"""The scheduler's end of one executor: its ROUTER socket and (usually) its child process.

    ExecutorLink.start()        spawn ``python -m tessera.executor`` (unless started elsewhere)
    ExecutorLink.poll_ready()   its ExecutorReady, once the model is loaded
    submit(plan) ... poll_result()  a step, watched: a result, StepFailed, or ExecutorLost;
                                    up to two in flight (async scheduling), answered in order
    ExecutorLink.kill()         SIGKILL and reap, before starting the next one

The socket is a CURVE server when the scheduler has keys (``executor.curve``). It is
bound once and outlives the executors: each new one connects to the same
address. Step ids count on across executors, so a stale result from an earlier one is
recognised and dropped. An executor that dies (its process exits, or with
``--no-start-executor`` its connection drops) or runs one step longer than
``step_timeout`` is lost: ``ExecutorLost``, which the scheduler answers by starting
another (scheduler/recovery.py). Whatever arrives on the socket is decoded strictly;
what does not parse is logged, never unpickled.

Only the executor of this start is heard. Anyone who can reach the address (the same
user, on the run directory's ipc path) can connect, so the socket is a ROUTER, which
takes every peer and names each message's sender, and the scheduler talks to one:

    scheduler ROUTER (binds)  <── DEALER, routing id = this start's token: the executor
                              <── any other peer: its messages dropped, logged at most
                                  once per _STRAY_LOG_S; it is sent nothing

Each start of an executor this link spawns draws a fresh random token, which rank 0
gets in its environment (``TESSERA_LINK_TOKEN``: a command line is public, and the
token is never logged) and presents as its routing id when it connects. A stray
peer, an executor of an earlier start, or one that guessed wrong is never admitted
and never blocks the right one, which may connect before or after it (a PAIR, by
contrast, belonged to whoever connected first). An executor started elsewhere cannot
know a token: the first peer to send a valid ExecutorReady is adopted, and only its
connection's drop counts as the executor's; beyond this machine CURVE decides who may
connect at all.

The first executor sizes the KV pool; every later one is started with that exact pool
(``--num-kv-blocks``, ``--max-model-len``) and must report the same EngineInfo, since
the scheduler's block tables outlive it.

Tensor parallel (``tensor_parallel_size`` N > 1): the executor is a group of N ranks,
started together, meeting at a fresh torch.distributed rendezvous file each start. The
plans go out once on a PUB that every rank reads (``common.plan_bus``), under a topic
drawn for that start; the ROUTER carries rank 0's ExecutorReady and results. The group is
ready once rank 0 says so (every rank has loaded; their pools agreed on the smallest)
and all N ranks have subscribed. Any rank that exits, or a step past the timeout, loses
the whole group: every rank is killed and reaped, and the next start replaces them all.
Torch-free.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

from tessera.common.cli_args import config_to_argv, env_name
from tessera.common.curve import ServerKeys
from tessera.common.plan import StepPlan, StepResult
from tessera.common.plan_bus import PlanPublisher, new_topic
from tessera.common.wire import WireError, decode, encode, plan_to_pb, result_from_pb
from tessera.proto.tessera.v1 import engine_pb2
from tessera.scheduler.config import SchedulerServerConfig

logger = logging.getLogger(__name__)

_POLL_S = 0.5  # how often a wait on the executor looks at its process and SIGTERM
_STRAY_LOG_S = 10.0  # messages from other peers are logged at most this often
LINK_TOKEN_ENV = env_name("link_token")  # ExecutorServerConfig.link_token, for the child


class Interrupted(Exception):
    """SIGTERM (or the parent's death) while waiting on the executor."""


class ExecutorError(RuntimeError):
    """The executor did not start, died, hung, or broke the protocol."""


class ExecutorLost(ExecutorError):
    """A serving executor died or hung: start another and recompute its requests."""


class StepFailed(RuntimeError):
    """One step failed in the executor: its requests fail, the engine goes on."""


class ExecutorLink:
    """The executor process and the ROUTER socket to it."""

    def __init__(
        self,
        ctx: zmq.Context,
        config: SchedulerServerConfig,
        stop: threading.Event,
        keys: ServerKeys | None = None,
    ) -> None:
        self.stop = stop
        self.step_timeout = config.step_timeout
        self.start_executor = config.start_executor
        self._private_dir: str | None = None
        address = config.executor_address
        if not address:
            self._private_dir = tempfile.mkdtemp(prefix="tessera-engine-")
            address = f"ipc://{self._private_dir}/executor.sock"
        self.address = address
        self._config = config.executor_config(address)
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to no one raises
        bind(self.socket, address, keys)
        # Connections that drop: how an executor started elsewhere is seen to die (its
        # own connection's, told by its file descriptor; other peers come and go).
        self._events = self.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        # The routing id of this start's executor: its token when this link started it;
        # None until an executor started elsewhere has sent its ExecutorReady.
        self._peer: bytes | None = None
        self._peer_fd = -1  # the file descriptor of its connection, once it spoke
        self._strays = _Strays()
        self.info: engine_pb2.EngineInfo | None = None  # the first executor's
        self.process: subprocess.Popen | None = None  # rank 0
        self.others: list[subprocess.Popen] = []  # ranks 1 .. N-1
        self.tensor_parallel_size = config.tensor_parallel_size
        self.plans: PlanPublisher | None = None
        self._ready: engine_pb2.EngineInfo | None = None  # rank 0 ready, ranks subscribing
        self._num_starts = 0
        if self.tensor_parallel_size > 1:
            if self._private_dir is None:  # the rendezvous files
                self._private_dir = tempfile.mkdtemp(prefix="tessera-engine-")
            plan_address = config.plan_address or f"ipc://{self._private_dir}/plans.sock"
            self.plans = PlanPublisher(ctx, plan_address, keys)
        self._ready_deadline = 0.0
        self._next_step_id = 1
        self._in_flight: deque[int] = deque()  # step ids sent, results not yet read
        self._step_deadline: float | None = None  # for the oldest step in flight

    # -- lifecycle ---------------------------------------------------------------

    def start(self, timeout: float) -> None:
        """Start an executor (or, started elsewhere, wait for one); it has ``timeout``
        seconds to report ready through poll_ready."""
        self._ready_deadline = time.monotonic() + timeout
        self._drain_events()
        self._ready = None
        self._peer, self._peer_fd = None, -1
        self._num_starts += 1
        if self.plans is not None:  # ranks started elsewhere cannot know a drawn topic
            self.plans.expect(new_topic() if self.start_executor else "")
        if not self.start_executor:
            logger.info("waiting for an executor to connect to %s", self.address)
            return
        config = self._config
        if self.info is not None:  # the pool the scheduler's block tables index
            config = dataclasses.replace(
                config,
                num_kv_blocks=self.info.num_kv_blocks,
                max_model_len=self.info.max_model_len,
            )
        ranks = [config]
        if self.plans is not None:
            rendezvous = f"file://{self._private_dir}/rendezvous-{self._num_starts}"
            ranks = [
                dataclasses.replace(
                    config,
                    tensor_parallel_rank=rank,
                    dist_init_method=rendezvous,
                    plan_address=self.plans.address,
                    plan_topic=self.plans.topic.decode(),
                )
                for rank in range(self.tensor_parallel_size)
            ]
        token = secrets.token_hex(16)  # rank 0's routing id; the other ranks get none
        self._peer = token.encode()
        # Its own session: Ctrl-C in a terminal reaches the scheduler, which stops it.
        started = [
            subprocess.Popen(
                [
                    sys.executable, "-P", "-m", "tessera.executor",
                    *config_to_argv(c, skip=("link_token",)),
                ],
                start_new_session=True,
                env={**os.environ, LINK_TOKEN_ENV: token if rank == 0 else ""},
            )
            for rank, c in enumerate(ranks)
        ]  # fmt: skip
        self.process, self.others = started[0], started[1:]
        logger.info(
            "started executor pid %s on %s", ", ".join(str(p.pid) for p in started), self.address
        )

    def poll_ready(self) -> engine_pb2.EngineInfo | None:
        """The executor's EngineInfo once it is ready; None while it loads.

        ExecutorError if it exited, ran out of time, or reports another pool than the
        first executor did.
        """
        while self._ready is None and self.socket.poll(0):
            try:
                if (message := self._recv_one()) is None:
                    continue
                ready = decode(engine_pb2.ExecutorReady, message.data)
                _check_info(ready.info)
            except WireError as e:  # garbage, or a result of an executor gone before
                logger.warning("ignored a message from the executor (not ExecutorReady): %s", e)
                continue
            self._ready = ready.info
            # Drops reported so far are of earlier connections, one of which may have
            # had the descriptor this one reuses.
            self._drain_events()
            self._peer, self._peer_fd = message.peer, message.fd
        if self._ready is not None and (
            self.plans is None or self.plans.poll_subscriptions() >= self.tensor_parallel_size
        ):
            return self._accept(self._ready)
        code = self._exit_code()
        if code is not None:
            raise ExecutorError(
                f"the executor ({self._dead}) exited with code {code} before it was ready"
            )
        if time.monotonic() > self._ready_deadline:
            raise ExecutorError("the executor took too long to load the model")
        return None

    def wait_ready(self, timeout: float) -> engine_pb2.EngineInfo:
        """Start the first executor and wait for it (Interrupted on SIGTERM)."""
        self.start(timeout)
        while (info := self.poll_ready()) is None:
            if self.stop.is_set():
                raise Interrupted
            self.socket.poll(int(_POLL_S * 1000))
        return info

    def kill(self) -> None:
        """Make sure the executor is gone (SIGKILL and reap); nothing it sent counts."""
        self._step_deadline = None
        self._in_flight.clear()
        for other in self.others:  # the whole group goes
            if other.poll() is None:
                logger.warning("killing executor rank pid %d", other.pid)
                other.kill()
            other.wait()
        if self.process is None:
            logger.warning(
                "an executor started elsewhere cannot be killed from here: restart it, "
                "and it reconnects to %s",
                self.address,
            )
            return
        if self.process.poll() is None:
            logger.warning("killing executor pid %d", self.process.pid)
            self.process.kill()
        self.process.wait()

    def close(self, timeout: float = 10.0) -> None:
        for other in self.others:
            if other.poll() is None:
                other.terminate()
        for other in self.others:
            try:
                other.wait(timeout)
            except subprocess.TimeoutExpired:
                other.kill()
                other.wait()
        if self.plans is not None:
            self.plans.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.error("the executor did not stop in %.0fs; killing it", timeout)
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            logger.info("the executor exited with code %d", self.process.returncode)
        self._events.close()
        self.socket.close()
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)

    # -- steps -------------------------------------------------------------------

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    def submit(self, plan: StepPlan) -> None:
        """Send one step; poll_result() gives the results in the order of the submits."""
        step_id = self._next_step_id
        self._next_step_id += 1
        if self.plans is not None:  # one send, read by every rank
            self.check_alive()
            self.plans.publish(encode(plan_to_pb(plan, step_id)))
            self._in_flight.append(step_id)
            if len(self._in_flight) == 1:
                self._start_clock()
            return
        assert self._peer is not None, "submit before the executor was ready"
        try:
            # Not connected (EHOSTUNREACH: ROUTER_MANDATORY) or not reading (EAGAIN): a
            # send that cannot go means it is gone.
            self.socket.send_multipart(
                [self._peer, encode(plan_to_pb(plan, step_id))], flags=zmq.NOBLOCK
            )
        except zmq.ZMQError:
            # The same loss as the one poll_result reports: say why when it is known
            # (with two steps in flight a send can be the first to meet it).
            self.check_alive()
            raise ExecutorLost("the executor is not connected") from None
        self._in_flight.append(step_id)
        if len(self._in_flight) == 1:
            self._start_clock()

    def _start_clock(self) -> None:
        """The watchdog runs on the oldest step in flight, from when it became oldest
        (the one queued behind it starts only when it ends)."""
        if self.step_timeout is not None:
            self._step_deadline = time.monotonic() + self.step_timeout

    def poll_result(self) -> StepResult | None:
        """The result of the oldest step in flight if it is there, else None.

        StepFailed if the executor reports an error or sends what does not parse;
        ExecutorLost if it died, or ran past the step timeout (then it is killed).
        """
        step_id = self._in_flight[0]
        while self.socket.poll(0):
            try:
                if (message := self._recv_one()) is None:
                    continue
                pb = decode(engine_pb2.StepResult, message.data)
            except WireError as e:
                self._step_done()
                raise StepFailed(f"unreadable step result: {e}") from e
            if 0 < pb.step_id < step_id:  # sent before an executor was lost
                logger.warning("dropped the result of step %d, long over", pb.step_id)
                continue
            self._step_done()
            if pb.error and pb.step_id in (0, step_id):  # 0: it could not read the plan
                raise StepFailed(pb.error)
            if pb.step_id != step_id:
                raise StepFailed(f"the executor answered step {pb.step_id}, not {step_id}")
            try:
                return result_from_pb(pb)
            except WireError as e:
                raise StepFailed(f"unreadable step result: {e}") from e
        self._check_step(step_id)
        return None

    def _step_done(self) -> None:
        self._in_flight.popleft()
        self._step_deadline = None
        if self._in_flight:
            self._start_clock()

    def check_alive(self) -> None:
        """ExecutorLost if the executor has died (between steps)."""
        code = self._exit_code()
        if code is not None:
            raise ExecutorLost(f"the executor ({self._dead}) exited with code {code}")
        if self._disconnected():
            raise ExecutorLost("the executor's connection dropped")

    def _check_step(self, step_id: int) -> None:
        """ExecutorLost if the executor died during the step, or has run it too long."""
        code = self._exit_code()
        if code is not None:
            raise ExecutorLost(
                f"the executor ({self._dead}) exited with code {code} while "
                f"running step {step_id}"
            )
        if self._disconnected():
            raise ExecutorLost(f"the executor's connection dropped during step {step_id}")
        if self._step_deadline is not None and time.monotonic() > self._step_deadline:
            self.kill()
            raise ExecutorLost(
                f"step {step_id} ran longer than step_timeout={self.step_timeout:g}s: "
                "the executor hung and was killed"
            )

    def _recv_one(self) -> _Message | None:
        """The next message if the executor sent it (one frame, WireError otherwise);
        None for a message of another peer, which is dropped."""
        frames = self.socket.recv_multipart(copy=False)
        peer = frames[0].bytes
        if self._peer is not None and peer != self._peer:
            self._strays.dropped()
            return None
        if len(frames) != 2:
            raise WireError(f"{len(frames) - 1} frames instead of 1")
        return _Message(peer, frames[0].get(zmq.SRCFD), frames[1].bytes)

    # -- helpers -----------------------------------------------------------------

    def _accept(self, info: engine_pb2.EngineInfo) -> engine_pb2.EngineInfo:
        if self.info is None:
            self.info = info
        elif info != self.info:
            raise ExecutorError(
                f"the new executor reports {_describe(info)}, but the first reported "
                f"{_describe(self.info)}; start it with the first one's settings"
            )
        return info

    def _exit_code(self) -> int | None:
        """The exit code of a rank that has exited (rank 0's first), else None."""
        for process in [self.process, *self.others]:
            if process is not None and (code := process.poll()) is not None:
                return code
        return None

    @property
    def _dead(self) -> str:
        """The rank that exited, for a message."""
        for rank, process in enumerate([self.process, *self.others]):
            if process is not None and process.poll() is not None:
                suffix = f" rank {rank}" if self.others else ""
                return f"pid {process.pid}{suffix}"
        return "pid ?"

    def _disconnected(self) -> bool:
        """Whether a connection dropped since the last start (the child's exit code
        says more, so only an executor started elsewhere is judged by this)."""
        if self.process is not None:
            return False
        return self._drain_events()

    def _drain_events(self) -> bool:
        """Read the socket's events; whether the executor's connection dropped. (A
        descriptor is reused only once its connection's drop is in this queue, so an
        event read after the executor's first message is of its connection.)"""
        dropped = False
        while self._events.poll(0):
            event = recv_monitor_message(self._events)
            dropped |= self._peer_fd >= 0 and int(event["value"]) == self._peer_fd
        return dropped


@dataclasses.dataclass(slots=True, frozen=True)
class _Message:
    """One message of the executor: who sent it, on which connection, and its bytes."""

    peer: bytes  # routing id
    fd: int  # the connection's file descriptor
    data: bytes


class _Strays:
    """Messages of peers that are not this start's executor: dropped, and logged at
    most once per _STRAY_LOG_S, so a chatty stray cannot flood the log."""

    def __init__(self) -> None:
        self.num_dropped = 0
        self._num_logged = 0
        self._log_at = 0.0

    def dropped(self) -> None:
        # No routing id in the log: an executor of an earlier start sends its token.
        self.num_dropped += 1
        now = time.monotonic()
        if now < self._log_at:
            return
        self._log_at = now + _STRAY_LOG_S
        logger.warning(
            "dropped %d message(s) from peers that are not the executor: only the "
            "executor started for this link is heard",
            self.num_dropped - self._num_logged,
        )
        self._num_logged = self.num_dropped


def bind(socket: zmq.Socket, address: str, keys: ServerKeys | None = None) -> str:
    """Bind and return the address bound: an ipc path's directory is created, and TCP
    without a host binds 127.0.0.1. With ``keys``, a TCP socket is a CURVE server (the
    config refused an address beyond loopback without them). Raises OSError with the
    address if the bind fails.
    """
    if address.startswith("ipc://"):
        Path(address.removeprefix("ipc://")).parent.mkdir(parents=True, exist_ok=True)
    elif address.startswith("tcp://"):
        host = address.removeprefix("tcp://").rpartition(":")[0]
        if host == "":
            address = "tcp://127.0.0.1" + address.removeprefix("tcp://")
    if keys is not None:
        keys.secure(socket, address)
    try:
        socket.bind(address)
    except zmq.ZMQError as e:
        raise OSError(f"cannot bind {address}: {e.strerror}") from e
    return address


def _check_info(info: engine_pb2.EngineInfo) -> None:
    """WireError unless the info describes a usable pool (an empty message parses too)."""
    if info.num_kv_blocks < 1 or info.block_size < 1 or info.max_model_len < 2:
        raise WireError(f"ExecutorReady without a usable pool: {_describe(info)}")
    if info.vocab_size < 1:
        raise WireError("ExecutorReady without a vocabulary size")


def _describe(info: engine_pb2.EngineInfo) -> str:
    return (
        f"model {info.model!r}, {info.num_kv_blocks} KV blocks of {info.block_size} tokens, "
        f"max_model_len {info.max_model_len}, vocabulary {info.vocab_size}"
    )
