"""Tensor parallel in one process (the offline ``LLM``): rank 0 runs in the caller, the
other ranks are executor processes that read the plans rank 0 runs.

    LLM ── ParallelRunner.submit(plan) ──┬─ publish [topic, StepPlan] ──> ranks 1 .. N-1
                                         └─ ModelRunner.submit(plan)      (rank 0, here)

The served engine does the same with the scheduler as the publisher (scheduler.
executor_link); here the ranks are ``python -m tessera.executor`` processes without a
link back (rank 0 is the only one that answers, and it is in this process). They exit
with this process, and ``close`` stops them.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import zmq

from tessera.common.cli_args import config_to_argv
from tessera.common.executor_config import ExecutorConfig, ExecutorServerConfig
from tessera.common.plan import StepPlan
from tessera.common.plan_bus import PlanPublisher, new_topic
from tessera.common.wire import encode, plan_to_pb
from tessera.executor.model_runner import ModelRunner, Step
from tessera.executor.parallel import destroy_group

logger = logging.getLogger(__name__)

_SHARED_FIELDS = [
    f.name
    for f in dataclasses.fields(ExecutorServerConfig)
    if f.name in ExecutorConfig.__dataclass_fields__ and f.name != "tensor_parallel_rank"
]


class OtherRanks:
    """Ranks 1 .. N-1 as child processes, and the PUB they read the plans from."""

    def __init__(self, config: ExecutorConfig) -> None:
        n = config.tensor_parallel_size
        self._dir = tempfile.mkdtemp(prefix="tessera-tp-")
        self._ctx = zmq.Context()
        self.plans = PlanPublisher(self._ctx, f"ipc://{self._dir}/plans.sock")
        topic = new_topic()
        self.plans.expect(topic)
        init = f"file://{self._dir}/rendezvous"
        self.rank0_config = dataclasses.replace(config, dist_init_method=init)
        self.processes: list[subprocess.Popen] = []
        for rank in range(1, n):
            rank_config = ExecutorServerConfig(
                executor_address="",
                **{name: getattr(self.rank0_config, name) for name in _SHARED_FIELDS},
                tensor_parallel_rank=rank,
                plan_address=self.plans.address,
                plan_topic=topic,
            )
            self.processes.append(
                subprocess.Popen(
                    [sys.executable, "-P", "-m", "tessera.executor", *config_to_argv(rank_config)]
                )
            )
        self._next_step_id = 1

    def wait_subscribed(self, timeout: float = 600.0) -> None:
        """Until every rank reads the plans (RuntimeError if one exits or time runs out)."""
        deadline = time.monotonic() + timeout
        while self.plans.poll_subscriptions() < len(self.processes):
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError("the tensor-parallel ranks did not subscribe to the plans")
            self.plans.socket.poll(50)

    def check_alive(self) -> None:
        for rank, p in enumerate(self.processes, start=1):
            if p.poll() is not None:
                raise RuntimeError(f"tensor-parallel rank {rank} exited with code {p.returncode}")

    def publish(self, plan: StepPlan) -> None:
        self.plans.publish(encode(plan_to_pb(plan, self._next_step_id)))
        self._next_step_id += 1

    def close(self, timeout: float = 10.0) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.terminate()
        for p in self.processes:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.plans.close()
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)


class ParallelRunner:
    """Rank 0's model runner, which hands every plan to the other ranks as it runs it.

    Reads like a ModelRunner to the engine (every other attribute is the runner's)."""

    def __init__(self, config: ExecutorConfig) -> None:
        self._threads = torch.get_num_threads()  # init_group shares the cores out
        self.ranks = OtherRanks(config)
        try:
            self.runner = ModelRunner(self.ranks.rank0_config)
            self.runner.group.barrier()  # every rank loaded
            self.ranks.wait_subscribed()
        except BaseException:
            self.close()
            raise

    def submit(self, plan: StepPlan) -> Step:
        self.ranks.check_alive()
        self.ranks.publish(plan)
        return self.runner.submit(plan)

    def execute(self, plan: StepPlan):
        return self.runner.collect(self.submit(plan))

    def __getattr__(self, name: str):
        return getattr(self.__dict__["runner"], name)

    def close(self) -> None:
        self.ranks.close()
        destroy_group()
        torch.set_num_threads(self._threads)
