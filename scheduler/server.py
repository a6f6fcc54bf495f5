"""The scheduler process: gateways in, executor below, one step at a time.

    gateway DEALER ──┐                                 ┌── ROUTER (binds)
    gateway DEALER ──┴─► ROUTER (binds) ── scheduler ──┘      ▲
                                                              └── DEALER (connects):
                                                                  executor child process

The scheduler binds a ROUTER for the gateways (``gateway_address``) and a ROUTER for its
executor (``executor_address``, a private ``ipc://`` path by default), on which it hears
only the executor it started (scheduler/executor_link.py). Then it starts the executor
as its child process (``python -m tessera.executor``), which exits with it. It waits
for ``ExecutorReady`` and sizes its block pool from it. Then the loop:

    recv_requests -> finish_step -> process_result -> schedule -> start_step -> send_outputs

so that gateway messages are read, and the last step's outputs sent, while the executor
runs the next step.

It waits on the gateways only when there is nothing to run. Every output goes to the
gateway that sent the request; a gateway that says goodbye, that cannot be reached, or
that sent heartbeats and then fell silent for their timeout (dead, or hung) has its
requests aborted (their blocks are free at once). Whatever a gateway sends is parsed as
a ``GatewayMessage`` or dropped with a warning: nothing it sends can raise out of the
loop.

Admission is bounded, so overload is a fast "overloaded" rejection (RESOURCE_EXHAUSTED /
HTTP 429 at the gateway), never an unbounded backlog: at most ``max_waiting`` sequences
and ``max_waiting_tokens`` tokens wait. The sequences of one AddRequests (a request with
n > 1) are admitted whole or not at all.

Both sockets stay on ipc:// or loopback unless CURVE keys are configured
(``executor.curve``): binding tcp:// beyond loopback without them is refused when the
config is built, and with them a ZAP handler admits only the authorized gateway and
executor keys, so an unknown peer never gets a message read or a reply.

The executor may die (its process exits) or hang (one step runs past ``step_timeout``;
it is killed). Either way the step in flight produced nothing, and every running request
goes back to waiting, as after a preemption: outputs kept, blocks free. A new executor
starts with the same pool, and the requests are recomputed from prompt plus the tokens
already streamed, so each stream goes on with no token lost or repeated (greedy and
seeded outputs are the same as without the restart). Meanwhile the loop keeps serving
the gateways: aborts and status, and new requests, which wait. If the new executor
does not get ready, or executors keep dying before they complete a step, the engine is
unavailable: every open sequence ends with error_kind "unavailable", new ones are
rejected as "unavailable", and the status says ENGINE_STATE_UNAVAILABLE, until an
attempt (with backoff) succeeds. scheduler/recovery.py has the states.

Exit codes: 0 on SIGTERM or parent death (after ending what is open and stopping the
executor; the executor also exits on its own when the scheduler dies), 1 if the first
executor fails to start, or on a bug in the loop.

The process is in three parts: this module (the process and its loop), sessions.py
(which gateway owns which request, the outbox, heartbeats) and messages.py (gateway
messages to requests and outputs back, checked); its config is in config.py.

No torch here, nor through imports: the executor is another process.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import zmq

from tessera.common.curve import ServerKeys
from tessera.common.plan import StepPlan, StepResult
from tessera.common.process import exit_with_parent, process_age, setup_logging
from tessera.common.wire import (
    WireError,
    decode,
)
from tessera.proto.tessera.v1 import engine_pb2
from tessera.scheduler.config import SchedulerServerConfig
from tessera.scheduler.executor_link import (
    ExecutorError,
    ExecutorLink,
    ExecutorLost,
    Interrupted,
    StepFailed,
    bind,
)
from tessera.scheduler.messages import request_from_pb
from tessera.scheduler.outputs import RequestOutput, TokenRow
from tessera.scheduler.recovery import EngineState, Recovery
from tessera.scheduler.scheduler import Scheduler
from tessera.scheduler.sessions import GatewaySessions

__all__ = [
    "ExecutorError",
    "ExecutorLost",
    "SchedulerServer",
    "StepFailed",
    "run_scheduler",
]

logger = logging.getLogger(__name__)

_IDLE_POLL_MS = 200  # how often an idle loop looks at SIGTERM and the executor
_RECOVERY_POLL_MS = 50  # how often a loop without an executor looks for a ready one
_STEP_POLL_MS = 200  # how often a wait on a step looks at the executor and its watchdog
_MAX_MESSAGES_PER_STEP = 1024  # gateway messages read between two steps, at most


def run_scheduler(config: SchedulerServerConfig) -> int:
    """The scheduler process (with its executor child); returns the exit code."""
    setup_logging("scheduler")
    exit_with_parent()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    ctx = zmq.Context()
    executor: ExecutorLink | None = None
    authenticator = None
    try:
        keys = None
        if config.curve_secret_key_file and config.curve_authorized_keys:
            keys = ServerKeys.load(config.curve_secret_key_file, config.curve_authorized_keys)
            authenticator = keys.start_authenticator(ctx)  # before any socket binds
        executor = ExecutorLink(ctx, config, stop, keys)
        info = executor.wait_ready(config.executor_start_timeout)  # the first: no retry
        gateways = ctx.socket(zmq.ROUTER)
        gateways.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished gateway raises, we abort
        gateways.setsockopt(zmq.LINGER, 1000)  # the last outputs leave before we exit
        address = bind(gateways, config.gateway_address, keys)
        server = SchedulerServer(config, info, executor, gateways, stop)
        logger.info("serving %s to gateways on %s (ready %.1fs after start)", info.model,
                    address, process_age())
        return server.serve()
    except Interrupted:
        logger.info("stopped before the executor was ready")
        return 0
    except (ExecutorError, OSError, ValueError) as e:
        logger.error("%s", e)
        return 1
    finally:
        if executor is not None:
            executor.close()
        if authenticator is not None:
            authenticator.stop()
        ctx.destroy(linger=1000)


@dataclass(slots=True)
class Counters:
    num_steps: int = 0
    num_requests_added: int = 0
    num_requests_finished: int = 0
    num_requests_aborted: int = 0
    num_requests_failed: int = 0
    num_requests_rejected: int = 0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_bad_messages: int = 0


class SchedulerServer:
    def __init__(
        self,
        config: SchedulerServerConfig,
        info: engine_pb2.EngineInfo,
        executor: ExecutorLink,
        gateways: zmq.Socket,
        stop: threading.Event,
    ) -> None:
        self.config = config
        self.info = info
        self.executor = executor
        self.recovery = Recovery(
            executor, config.executor_start_timeout, config.max_executor_restarts
        )
        self.gateways = gateways  # ROUTER: GatewayMessage in, EngineOutputs out
        self.sessions = GatewaySessions(gateways)
        self.poller = zmq.Poller()  # while a step runs: its result, or a gateway message
        self.poller.register(executor.socket, zmq.POLLIN)
        self.poller.register(gateways, zmq.POLLIN)
        self.stop = stop
        self.scheduler = Scheduler(config.scheduler_config(info))
        self.counters = Counters()
        self.instance_id = uuid.uuid4().hex  # tells the gateways this process from the next
        self._stalled = False  # the last schedule() had nothing to run
        self._waiting_tokens: int | None = None  # within one recv_requests; None: recount
        # Queue time, for the gateways' metrics: when each request arrived here (until
        # its first admission), then how long it waited (until its first output).
        self._queued_at: dict[str, float] = {}
        self._queue_seconds: dict[str, float] = {}

    def serve(self) -> int:
        # Plans sent, oldest first. Async scheduling keeps two in flight: the executor
        # runs one while the next waits behind it, and the scheduler, meanwhile, takes
        # the older one's result, sends its outputs and schedules the one after.
        in_flight: deque[StepPlan] = deque()
        depth = 2 if self.config.async_scheduling else 1
        try:
            while not self.stop.is_set():
                # Gateway messages are read while the executor runs the steps in flight.
                self.recv_requests(busy=bool(in_flight))
                try:
                    if self.recovery.serving:
                        scheduled = False
                        if len(in_flight) < depth and (plan := self.schedule()) is not None:
                            in_flight.append(self.start_step(plan))
                            scheduled = True
                        if in_flight and (len(in_flight) == depth or not scheduled):
                            plan = in_flight.popleft()
                            result = self.finish_step(plan)
                            if result is not None:
                                self.process_result(plan, result)
                        elif not in_flight:
                            self.executor.check_alive()
                    else:
                        self.recover()
                except ExecutorLost as e:
                    in_flight.clear()
                    if self.stop.is_set():  # it went down with us (Ctrl-C, a stop)
                        break
                    self.executor_lost(str(e))
                # Outputs go out while the executor runs the next step.
                self.send_outputs()
        except Interrupted:  # SIGTERM while a step ran: its result no longer matters
            pass
        except Exception as e:  # a bug: end every stream with it rather than leave it open
            logger.exception("the scheduler loop failed")
            return self.give_up(f"the scheduler failed: {type(e).__name__}: {e}")
        self.fail_all("the scheduler is shutting down", kind="unavailable")
        logger.info("stopped")
        return 0

    def give_up(self, error: str) -> int:
        logger.error("%s; failing every open request", error)
        self.fail_all(error, kind="internal")
        return 1

    # -- the loop ----------------------------------------------------------------

    def recv_requests(self, busy: bool = False) -> None:
        """Read what the gateways sent; wait for it only when there is nothing to run."""
        if not self.recovery.serving:  # waiting on a new executor, not on the gateways
            timeout = _RECOVERY_POLL_MS
        elif busy or (not self._stalled and self.scheduler.has_unfinished_requests()):
            timeout = 0
        else:
            timeout = _IDLE_POLL_MS
        self._waiting_tokens = None  # steps ran since the last read: count again
        for _ in range(_MAX_MESSAGES_PER_STEP):
            if not self.gateways.poll(timeout):
                # Drained: a gateway not heard from by now has been silent all along.
                self.expire_gateways()
                break
            timeout = 0
            self.handle_message(self.gateways.recv_multipart())

    def schedule(self) -> StepPlan | None:
        self._waiting_tokens = None  # requests leave the waiting queue: count again
        plan = self.scheduler.schedule()
        now = time.monotonic()
        for new in plan.new_requests:  # the first admission only: popped
            queued_at = self._queued_at.pop(new.request_id, None)
            if queued_at is not None:
                self._queue_seconds[new.request_id] = now - queued_at
        self._stalled = plan.is_empty
        return None if plan.is_empty else plan

    def start_step(self, plan: StepPlan) -> StepPlan:
        """Send the plan; the executor works on it until finish_step collects it."""
        self.counters.num_steps += 1
        self.executor.submit(plan)
        return plan

    def finish_step(self, plan: StepPlan) -> StepResult | None:
        """The executor's result, or None if the step failed (its requests fail).

        ExecutorLost if the executor died or hung during the step.
        """
        try:
            result = self.wait_for_result()
        except StepFailed as e:
            logger.error("step failed: %s", e)
            self.fail_requests(plan.num_scheduled_tokens, str(e), kind="internal")
            return None
        self.recovery.step_completed()
        return result

    def wait_for_result(self) -> StepResult:
        """The step's result; the gateways are answered while the executor works on it,
        so that status and aborts do not wait for a long step (or a hung one)."""
        while (result := self.executor.poll_result()) is None:
            if self.stop.is_set():
                raise Interrupted
            ready = dict(self.poller.poll(_STEP_POLL_MS))
            if self.gateways in ready:
                self.recv_requests(busy=True)
        return result

    def process_result(self, plan: StepPlan, result: StepResult) -> None:
        # The running requests' rows (nearly every output) go to the gateways whole;
        # the other outputs (stops, logprobs, embeddings) one by one.
        token_rows: dict[str, TokenRow] = {}
        try:
            outputs = self.scheduler.update_from_result(plan, result, token_rows)
        except RuntimeError as e:  # the executor broke the mirror rule: desynced
            logger.error("bad step result: %s", e)
            self.fail_requests(plan.num_scheduled_tokens, f"bad step result: {e}", kind="internal")
            return
        self.counters.num_generated_tokens += len(result.sampled_token_ids)
        self.sessions.route_token_rows(token_rows, self._queue_seconds)
        for output in outputs:
            self.emit(output)

    def send_outputs(self) -> None:
        for gateway, outputs in self.sessions.take_outbox().items():
            self.send(gateway, outputs)

    # -- a lost executor -------------------------------------------------------------

    def executor_lost(self, why: str) -> None:
        """The executor died or hung, with the step in flight: recompute what ran.

        requeue_running also empties the prefix cache: the K/V it named died with the
        executor."""
        self._stalled = False
        num_requeued = self.scheduler.requeue_running()
        logger.error("%s; %d running requests will be recomputed", why, num_requeued)
        if self.recovery.lost(why) is EngineState.UNAVAILABLE:
            self.fail_all(self.unavailable_message(), kind="unavailable")

    def recover(self) -> None:
        """Move the restart along; act on what it comes to."""
        state = self.recovery.poll()
        if state is EngineState.UNAVAILABLE:
            self.fail_all(self.unavailable_message(), kind="unavailable")
        elif state is EngineState.SERVING:
            logger.info(
                "resuming: %d requests wait to run on the new executor",
                self.scheduler.num_waiting,
            )

    def unavailable_message(self) -> str:
        return f"the engine is unavailable: {self.recovery.reason}"

    # -- gateway messages ----------------------------------------------------------

    def handle_message(self, frames: list[bytes]) -> None:
        self.sessions.heard_from(frames[0])
        if len(frames) != 2:
            self._bad_message(frames[0], f"{len(frames) - 1} frames instead of 1")
            return
        gateway, data = frames
        try:
            msg = decode(engine_pb2.GatewayMessage, data)
        except WireError as e:
            self._bad_message(gateway, str(e))
            return
        kind = msg.WhichOneof("kind")
        try:
            if kind == "add":
                self.add_requests(gateway, msg.add.sequences)
            elif kind == "abort":
                self.abort_requests(gateway, msg.abort.request_ids)
            elif kind == "status":
                self.reply_status(gateway, msg.status.query_id, msg.status.reset_prefix_cache)
            elif kind == "goodbye":
                self.forget_gateway(gateway)
            elif kind == "heartbeat":
                self.watch_gateway(gateway, msg.heartbeat.timeout_ms)
            else:
                self._bad_message(gateway, "a GatewayMessage with no kind set")
        except Exception:  # a bug; the engine must outlive it
            logger.exception("gateway %r: handling a %s message failed", gateway, kind)
            self.counters.num_bad_messages += 1

    def add_requests(self, gateway: bytes, sequences: Iterable[engine_pb2.AddSequence]) -> None:
        """Admit every sequence of one AddRequests, or reject them all."""
        sequences = list(sequences)
        request_ids = [seq.request_id for seq in sequences]
        if self.recovery.state is EngineState.UNAVAILABLE:
            self.reject(gateway, request_ids, "unavailable", self.unavailable_message())
            return
        try:
            requests = [request_from_pb(seq, self.info) for seq in sequences]
            if len(set(request_ids)) != len(request_ids):
                raise ValueError(f"request ids {request_ids} repeat within one AddRequests")
            for request in requests:
                self.scheduler.check_admissible(request)
            if len(requests) > self.config.max_waiting:
                raise ValueError(
                    f"{len(requests)} sequences in one AddRequests can never fit "
                    f"max_waiting={self.config.max_waiting}"
                )
        except ValueError as e:  # RequestRejected and WireError among them
            self.reject(gateway, request_ids, "invalid", str(e))
            return
        if self.scheduler.num_waiting + len(requests) > self.config.max_waiting:
            self.reject(
                gateway,
                request_ids,
                "overloaded",
                f"{self.scheduler.num_waiting} sequences are waiting already "
                f"(max_waiting={self.config.max_waiting}); retry later",
            )
            return
        num_tokens = sum(request.num_tokens for request in requests)
        if num_tokens > self.config.max_waiting_tokens:
            self.reject(
                gateway,
                request_ids,
                "invalid",
                f"{num_tokens} prompt tokens in one AddRequests can never fit "
                f"max_waiting_tokens={self.config.max_waiting_tokens}",
            )
            return
        waiting_tokens = self.num_waiting_tokens()
        if waiting_tokens + num_tokens > self.config.max_waiting_tokens:
            self.reject(
                gateway,
                request_ids,
                "overloaded",
                f"{waiting_tokens} tokens are waiting already "
                f"(max_waiting_tokens={self.config.max_waiting_tokens}); retry later",
            )
            return
        self._waiting_tokens = waiting_tokens + num_tokens
        for request in requests:
            self.scheduler.add_request(request)
            self._queued_at[request.request_id] = time.monotonic()
            self.sessions.own(request.request_id, gateway)
            self.counters.num_requests_added += 1
            self.counters.num_prompt_tokens += request.num_prompt_tokens

    def abort_requests(self, gateway: bytes, request_ids: Iterable[str]) -> None:
        """Abort the given requests of this gateway (others' and unknown ids are skipped)."""
        mine = [rid for rid in request_ids if self.sessions.owners.get(rid) == gateway]
        for output in self.scheduler.abort_requests(mine):
            self.emit(output)

    def reply_status(self, gateway: bytes, query_id: int, reset_prefix_cache: bool = False) -> None:
        pending = self.sessions.take(gateway)
        if pending is not None:  # keep the order the gateway would expect
            self.send(gateway, pending)
        num_dropped = 0
        if reset_prefix_cache:
            num_dropped = self.scheduler.reset_prefix_cache()
            logger.info("prefix cache reset by a gateway: %d cached blocks dropped", num_dropped)
        reply = engine_pb2.StatusReply(
            num_prefix_cache_blocks_dropped=num_dropped,
            query_id=query_id,
            info=self.info,
            load=self.load(),
            counters=self.totals(),
            state=self.recovery.state.value,
            state_reason=self.recovery.reason,
            instance_id=self.instance_id,
        )
        self.send(gateway, engine_pb2.EngineOutputs(status=reply))

    def watch_gateway(self, gateway: bytes, timeout_ms: int) -> None:
        """Heartbeats from this gateway: abort its requests once it is silent that long."""
        self.sessions.watch(gateway, timeout_ms)

    def expire_gateways(self) -> None:
        """Forget the watched gateways that fell silent: dead, hung, or cut off.

        Their requests end as failed ("unavailable"), and that is still sent, without
        waiting: a gateway that was only slow then ends its streams instead of waiting
        for outputs that will never come; to a dead one the send just fails.
        """
        for gateway, silence, timeout in self.sessions.silent():
            request_ids = self.sessions.requests_of(gateway)
            logger.warning(
                "gateway %r sent nothing for %.1fs (its heartbeat timeout is %gs): "
                "ending its %d requests",
                gateway, silence, timeout, len(request_ids),
            )  # fmt: skip
            self.fail_requests(
                request_ids, f"the gateway was silent for {silence:.1f}s", kind="unavailable"
            )
            outputs = self.sessions.take(gateway)
            if outputs is not None:
                self.sessions.send(gateway, outputs, quiet=True)  # gone, most likely

    def forget_gateway(self, gateway: bytes) -> None:
        """The gateway is gone: abort its requests, send it nothing more."""
        request_ids = self.sessions.requests_of(gateway)
        for output in self.scheduler.abort_requests(request_ids):
            self.emit(output)
        self.sessions.drop(gateway)
        if request_ids:
            logger.info("gateway %r left: aborted %d requests", gateway, len(request_ids))

    # -- outputs -------------------------------------------------------------------

    def emit(self, output: RequestOutput, error: str = "", kind: str = "") -> None:
        """Queue one request's output for its gateway; forget the owner once finished.

        ``error`` and its ``kind`` ("internal" or "unavailable") mark a failed request.
        """
        queue_seconds = 0.0
        if output.new_token_ids or output.finished:
            queue_seconds = self._queue_seconds.pop(output.request_id, 0.0)
        if output.finished:
            self._count_finish(output.finish_reason, error)
            self._queued_at.pop(output.request_id, None)  # never admitted
        self.sessions.route(output, error, kind, queue_seconds)

    def reject(self, gateway: bytes, request_ids: list[str], kind: str, message: str) -> None:
        # Overload and unavailability come in floods; the state change was logged.
        log = logger.debug if kind in ("overloaded", "unavailable") else logger.info
        log("rejected %d sequences (%s): %s", len(request_ids), kind, message)
        self.counters.num_requests_rejected += len(request_ids)
        self.sessions.reject(gateway, request_ids, kind, message)

    def fail_requests(self, request_ids: Iterable[str], error: str, kind: str) -> None:
        """End these requests with finish reason "error"; their blocks are free at once."""
        for output in self.scheduler.abort_requests(list(request_ids)):
            self.emit(output, error=error, kind=kind)

    def fail_all(self, error: str, kind: str) -> None:
        """End every open request with finish reason "error", and send that now."""
        self.fail_requests(list(self.sessions.owners), error, kind)
        self.send_outputs()

    def send(self, gateway: bytes, outputs: engine_pb2.EngineOutputs) -> None:
        if not self.sessions.send(gateway, outputs):
            self.forget_gateway(gateway)

    # -- state -----------------------------------------------------------------------

    def num_waiting_tokens(self) -> int:
        """Tokens of the waiting requests (counted once per read of the gateways)."""
        if self._waiting_tokens is None:
            self._waiting_tokens = sum(r.num_tokens for r in self.scheduler.waiting)
        return self._waiting_tokens

    def load(self) -> engine_pb2.EngineLoad:
        return engine_pb2.EngineLoad(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_kv_blocks_used=self.scheduler.num_used_blocks,
            num_kv_blocks_free=self.scheduler.num_free_blocks,
            num_kv_blocks_cached=self.scheduler.num_cached_blocks,
            num_waiting_tokens=self.num_waiting_tokens(),
        )

    def totals(self) -> engine_pb2.EngineCounters:
        c = self.counters
        return engine_pb2.EngineCounters(
            num_steps=c.num_steps,
            num_preemptions=self.scheduler.num_preemptions,
            num_requests_added=c.num_requests_added,
            num_requests_finished=c.num_requests_finished,
            num_requests_aborted=c.num_requests_aborted,
            num_requests_failed=c.num_requests_failed,
            num_requests_rejected=c.num_requests_rejected,
            num_prompt_tokens=c.num_prompt_tokens,
            num_generated_tokens=c.num_generated_tokens,
            num_bad_messages=c.num_bad_messages,
            num_executor_restarts=self.recovery.num_restarts,
            num_prefix_cache_queries=self.scheduler.num_prefix_cache_queries,
            num_prefix_cache_hits=self.scheduler.num_prefix_cache_hits,
        )

    # -- helpers -------------------------------------------------------------------

    def _count_finish(self, finish_reason: str | None, error: str) -> None:
        if error and finish_reason == "abort":
            self.counters.num_requests_failed += 1
        elif finish_reason == "abort":
            self.counters.num_requests_aborted += 1
        else:
            self.counters.num_requests_finished += 1

    def _bad_message(self, gateway: bytes, why: str) -> None:
        self.counters.num_bad_messages += 1
        logger.warning("ignored a message from gateway %r: %s", gateway, why)
