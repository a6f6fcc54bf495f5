"""Keeping the engine served when its executor dies or hangs: when to restart, when to
give up, when to try again.

    SERVING ──lost──► RECOVERING ──ready──► SERVING
       ▲                  │ the new executor does not get ready (it exits, or runs out
       │                  │ of executor_start_timeout), or max_executor_restarts
       │                  ▼ executors in a row died before completing a step
       └──ready──── UNAVAILABLE ◄─┐
                          └───────┘ a new attempt after a backoff (1 s, 2 s ... 30 s)

This class only decides and starts; the scheduler loop (server.py) acts on the states:
on a loss every running request goes back to waiting, to be recomputed by the next
executor; on UNAVAILABLE every open sequence fails with error_kind "unavailable" and new
ones are rejected, until an attempt succeeds. Torch-free, and deterministic given the
link's answers and the clock, so it is tested without processes.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from typing import Protocol

from tessera.proto.tessera.v1 import engine_pb2
from tessera.scheduler.executor_link import ExecutorError

logger = logging.getLogger(__name__)

BACKOFF_S = (1.0, 30.0)  # first wait between attempts once unavailable, and the cap


class EngineState(enum.Enum):
    SERVING = engine_pb2.ENGINE_STATE_SERVING
    RECOVERING = engine_pb2.ENGINE_STATE_RECOVERING
    UNAVAILABLE = engine_pb2.ENGINE_STATE_UNAVAILABLE


class Restartable(Protocol):
    """What recovery needs of the executor link (scheduler/executor_link.py)."""

    def start(self, timeout: float) -> None: ...
    def poll_ready(self) -> engine_pb2.EngineInfo | None: ...
    def kill(self) -> None: ...


class Recovery:
    def __init__(
        self,
        link: Restartable,
        start_timeout: float,
        max_restarts: int,
        clock: Callable[[], float] = time.monotonic,
        backoff: tuple[float, float] = BACKOFF_S,
    ) -> None:
        self.link = link
        self.start_timeout = start_timeout
        self.max_restarts = max_restarts
        self.clock = clock
        self.state = EngineState.SERVING
        self.reason = ""  # why the state is not SERVING
        self.num_restarts = 0  # executors started after the first
        self._crashes = 0  # executors lost in a row, none of which completed a step
        self._starting = False  # an executor was started and is not ready yet
        self._first_backoff, self._max_backoff = backoff
        self._backoff = self._first_backoff
        self._retry_at = 0.0

    @property
    def serving(self) -> bool:
        return self.state is EngineState.SERVING

    def step_completed(self) -> None:
        """A step came back: this executor works, its crash would be a new story."""
        self._crashes = 0

    def lost(self, why: str) -> EngineState:
        """The serving executor died or hung: kill it, start another or give up."""
        self.link.kill()
        self._crashes += 1
        if self._crashes > self.max_restarts:
            self._give_up(
                f"{why}; {self._crashes} executors in a row were lost before completing a "
                f"step (max_executor_restarts={self.max_restarts})"
            )
        else:
            self.state = EngineState.RECOVERING
            self.reason = f"{why}; waiting for a new executor"
            logger.error("%s", self.reason)
            self._start()
        return self.state

    def poll(self) -> EngineState | None:
        """Move a restart along without blocking; the new state if it changed."""
        if self.state is EngineState.SERVING:
            return None
        if not self._starting:
            if self.clock() >= self._retry_at:
                logger.info("trying to start an executor again")
                self._start()
            return None
        try:
            info = self.link.poll_ready()
        except ExecutorError as e:
            self.link.kill()
            self._starting = False
            before = self.state
            self._give_up(str(e))
            return self.state if self.state is not before else None
        if info is None:
            return None
        self._starting = False
        self.state = EngineState.SERVING
        self.reason = ""
        self._backoff = self._first_backoff
        logger.info("a new executor is ready: serving again")
        return self.state

    def _start(self) -> None:
        self.num_restarts += 1
        self._starting = True
        try:
            self.link.start(self.start_timeout)
        except OSError as e:  # the process could not even be created
            self._starting = False
            self._give_up(f"cannot start an executor: {e}")

    def _give_up(self, why: str) -> None:
        """UNAVAILABLE until an attempt after the backoff succeeds."""
        self.state = EngineState.UNAVAILABLE
        self._crashes = 0  # open sequences fail now: what crashed it is gone with them
        self._retry_at = self.clock() + self._backoff
        self.reason = f"{why}; next attempt in {self._backoff:g}s"
        self._backoff = min(2 * self._backoff, self._max_backoff)
        logger.error("%s", self.reason)
