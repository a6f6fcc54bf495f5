"""The executor process: loads the model, then runs each step plan the scheduler sends.

Socket: one ZeroMQ DEALER, connected to the scheduler's ROUTER. The scheduler binds
it (it starts first and starts this process as its child, on a private ``ipc://`` path
by default) and the executor connects; both directions share it:

    scheduler                          executor
     bind ROUTER  <──────────────────  connect DEALER (routing id: link_token)
                  <── ExecutorReady ──   (model loaded, KV pool sized)
                  ─── StepPlan 1 ────>
                  ─── StepPlan 2 ────>   (async scheduling: sent while 1 runs)
                  <── StepResult 1 ───   (error set if the step raised)
                  ─── StepPlan 3 ────>
                  <── StepResult 2 ───
                  ...

Results go back in the order of the plans. With a plan queued behind the step in
flight, the executor launches it before it waits for the step in flight (the model
runner's submit / collect), so the GPU goes from one step to the next without
waiting for the host; while a step runs with nothing queued, it watches the socket
for the next plan until the step is done, then sends the result. A step already done
when the next plan is read (a small model, whose steps take less device time than
host time) has its result sent before that plan is laid out, not after: the
scheduler's turn (the result read, outputs, the plan after next) then overlaps this
process's layout of the next step, instead of following it, while the device, done,
waits for that launch either way.

A step that raises does not end the process: the result carries the error, the
scheduler fails that step's requests, and the next plan tells the executor to forget
them. A message that is not one StepPlan (a pickle, garbage, several frames) is logged
and answered with an error under step id 0. The process exits 0 on SIGTERM and when its
parent dies. If it dies otherwise, or hangs, the scheduler kills it and starts another.

The link to the scheduler is plain on ipc:// and loopback; on any other address it
needs CURVE keys (``executor.curve``): this process's key pair and the scheduler's
public key, checked when the config is built. Other peers may connect to the
scheduler's ROUTER too; it hears only the executor whose routing id is the token it
drew for this start (``link_token``, passed in this process's environment), so a stray
peer can neither hold the link nor speak for the executor (scheduler/executor_link.py).

Tensor parallel (``tensor_parallel_size`` N > 1): N such processes, one per device,
join one torch.distributed group (``executor.parallel``). Every rank reads the plans
from the scheduler's PUB (``common.plan_bus``), under the topic of this start, and runs
them in lockstep; rank 0 alone has the DEALER, and sends ExecutorReady (once every rank
has loaded) and the results. A step that raises on a rank ends that rank (exit code
1): its peers would wait on it in the next collective, so the group fails as a whole
and the scheduler replaces every rank.

Test hook, never set in production: if ``TESSERA_TEST_EXECUTOR_FAIL_START`` names a file
that exists, the executor exits with code 1 at start-up, so tests can make a restart
fail (and then succeed, once the file is gone).

Importing this module does not import torch (the model runner is imported when the
executor starts); its process config, ExecutorServerConfig, lives in tessera.common.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

import zmq

from tessera.common.curve import client_keys
from tessera.common.executor_config import ExecutorServerConfig
from tessera.common.plan_bus import PlanSubscriber
from tessera.common.process import exit_with_parent, process_age, setup_logging
from tessera.common.wire import WireError, decode, encode, plan_from_pb, result_to_pb
from tessera.proto.tessera.v1 import engine_pb2

if TYPE_CHECKING:
    from tessera.executor.model_runner import ModelRunner, Step

logger = logging.getLogger(__name__)

FAIL_START_ENV = "TESSERA_TEST_EXECUTOR_FAIL_START"  # a test hook: see the docstring


def run_executor(config: ExecutorServerConfig) -> int:
    """The executor process: returns its exit code (0 on SIGTERM or parent death)."""
    setup_logging("executor")
    exit_with_parent()
    sentinel = os.environ.get(FAIL_START_ENV, "")
    if sentinel and os.path.exists(sentinel):
        logger.error("cannot start: %s exists (%s, a test hook)", sentinel, FAIL_START_ENV)
        return 1
    # SystemExit unwinds the load or the step loop alike and closes the socket on the way.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGINT, _exit_cleanly)
    ctx = zmq.Context()
    to_scheduler = ctx.socket(zmq.DEALER)
    to_scheduler.setsockopt(zmq.LINGER, 0)
    if config.link_token:  # how the scheduler tells us from any other peer
        to_scheduler.setsockopt(zmq.ROUTING_ID, config.link_token.encode())
    plans = None
    try:
        keys = client_keys(config.curve_secret_key_file, config.curve_server_key_file)
        if config.tensor_parallel_rank == 0:
            if keys is not None:
                keys.secure(to_scheduler, config.executor_address)
            to_scheduler.connect(config.executor_address)
        if config.tensor_parallel_size > 1:
            plans = PlanSubscriber(ctx, config.plan_address, config.plan_topic, keys)
        from tessera.executor.model_runner import (
            ModelRunner,  # torch: imported in this process only
        )

        runner = ModelRunner(config.runner_config)
        executor = Executor(runner, to_scheduler, config.max_model_len, plans)
        runner.group.barrier()  # every rank loaded: the engine is ready
        if runner.group.rank == 0:
            executor.send_ready()
        executor.serve_forever()
    except SystemExit:
        logger.info("stopping")
        return 0
    except ValueError as e:  # a setting the model or the device cannot meet
        logger.error("cannot start: %s", e)
        return 1
    finally:
        if plans is not None:
            plans.close()
        to_scheduler.close()
        ctx.term()


class Executor:
    """The step loop around a loaded model runner."""

    def __init__(
        self,
        runner: ModelRunner,
        to_scheduler: zmq.Socket,
        max_model_len: int | None = None,
        plans: PlanSubscriber | None = None,
    ) -> None:
        self.runner = runner
        self.socket = to_scheduler
        self.info = engine_info(runner, max_model_len)
        # Tensor parallel: plans come from the PUB, results go from rank 0 alone.
        self.plans = plans
        self.plan_socket = to_scheduler if plans is None else plans.socket
        group = getattr(runner, "group", None)  # None: a test's stand-in, one device
        self.sends_results = group is None or group.rank == 0
        self.fatal_errors = group is not None and group.is_parallel

    def send_ready(self) -> None:
        ready = engine_pb2.ExecutorReady(
            info=self.info,
            max_position_embeddings=self.runner.model_config.max_position_embeddings,
        )
        self.socket.send(encode(ready))
        logger.info(
            "ready: %s, max_model_len %d, %d KV blocks of %d tokens (%.1fs after start)",
            self.info.model,
            self.info.max_model_len,
            self.info.num_kv_blocks,
            self.info.block_size,
            process_age(),
        )

    def serve_forever(self) -> NoReturn:
        in_flight: _Submitted | None = None
        while True:
            pb = self.recv_plan() if in_flight is None else self.recv_plan_while(in_flight)
            if pb is None:  # the step in flight is done and no plan came
                self.send_result(in_flight)
                in_flight = None
                continue
            if in_flight is not None and self.runner.is_done(in_flight.step):
                # Done already (the host is the bottleneck, not the device): its result
                # goes first, so the scheduler plans the step after this one while this
                # one is laid out. The device waits for this launch either way.
                self.send_result(in_flight)
                in_flight = None
            submitted = self.submit(pb)  # launched before the step in flight is waited on
            if in_flight is not None:
                self.send_result(in_flight)
            in_flight = submitted
            if submitted.step is None or self.runner.is_done(submitted.step):
                self.send_result(submitted)  # failed, or run all at once (the CPU)
                in_flight = None

    def recv_plan(self) -> engine_pb2.StepPlan:
        try:
            if self.plans is not None:
                return decode(engine_pb2.StepPlan, self.plans.recv())
            frames = self.socket.recv_multipart()
            if len(frames) != 1:
                raise WireError(f"{len(frames)} frames instead of 1")
            return decode(engine_pb2.StepPlan, frames[0])
        except WireError as e:
            logger.warning("unreadable step plan: %s", e)
            # Step id 0 is never a real step: the scheduler fails the step it waits on
            # (results go in order, so that is this plan's).
            return engine_pb2.StepPlan(step_id=0)

    def recv_plan_while(self, in_flight: _Submitted) -> engine_pb2.StepPlan | None:
        """The next plan if one comes before the step in flight is done, else None."""
        while not self.runner.is_done(in_flight.step):
            if self.plan_socket.poll(0):
                return self.recv_plan()
            time.sleep(_SPIN_S)
        return self.recv_plan() if self.plan_socket.poll(0) else None

    def submit(self, pb: engine_pb2.StepPlan) -> _Submitted:
        if pb.step_id == 0:
            error = "the executor could not read the plan"
            return _Submitted(0, error=engine_pb2.StepResult(step_id=0, error=error))
        try:
            return _Submitted(pb.step_id, step=self.runner.submit(plan_from_pb(pb)))
        except Exception as e:  # one bad step fails its requests, not the process
            if self.fatal_errors:  # ... but a rank out of step would stall the group
                raise
            return _Submitted(pb.step_id, error=_failed(pb.step_id, e))

    def send_result(self, submitted: _Submitted) -> None:
        result = self.collect(submitted)
        if self.sends_results:
            self.socket.send(encode(result))

    def collect(self, submitted: _Submitted) -> engine_pb2.StepResult:
        if submitted.error is not None:
            return submitted.error
        try:
            return result_to_pb(self.runner.collect(submitted.step), submitted.step_id)
        except Exception as e:
            if self.fatal_errors:
                raise
            return _failed(submitted.step_id, e)

    def run_step(self, pb: engine_pb2.StepPlan) -> engine_pb2.StepResult:
        """One step, submitted and collected (tests and tools)."""
        return self.collect(self.submit(pb))


_SPIN_S = 50e-6  # the executor's sleep between looks at the socket and the step in flight


@dataclass(slots=True)
class _Submitted:
    """A plan the executor took: its launched step, or the error that stopped it."""

    step_id: int
    step: Step | None = None
    error: engine_pb2.StepResult | None = None


def _failed(step_id: int, e: Exception) -> engine_pb2.StepResult:
    """A step that raised: its requests fail, the executor goes on."""
    logger.exception("step %d failed", step_id)
    return engine_pb2.StepResult(step_id=step_id, error=f"{type(e).__name__}: {e}")


def engine_info(runner: ModelRunner, max_model_len: int | None) -> engine_pb2.EngineInfo:
    """What the scheduler and the gateways need to know of the loaded model and pool.

    max_model_len defaults to what both the model and the KV pool can hold.
    """
    mc = runner.model_config
    pool_tokens = runner.num_blocks * runner.block_size
    if max_model_len is None:
        max_model_len = min(mc.max_position_embeddings, pool_tokens)
    elif max_model_len > mc.max_position_embeddings:
        raise ValueError(
            f"max_model_len {max_model_len} exceeds the model's context length "
            f"{mc.max_position_embeddings}"
        )
    return engine_pb2.EngineInfo(
        model=runner.source.name,
        max_model_len=max_model_len,
        vocab_size=mc.vocab_size,
        block_size=runner.block_size,
        num_kv_blocks=runner.num_blocks,
        eos_token_ids=mc.eos_token_ids,
        hidden_size=mc.hidden_size,
    )


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)
