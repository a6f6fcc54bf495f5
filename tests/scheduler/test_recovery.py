"""When the scheduler restarts its executor, and when it gives up: scheduler/recovery.py
against a scripted executor link and a hand-moved clock."""

from __future__ import annotations

from tessera.proto.tessera.v1 import engine_pb2
from tessera.scheduler.executor_link import ExecutorError
from tessera.scheduler.recovery import EngineState, Recovery

INFO = engine_pb2.EngineInfo(model="m", max_model_len=64, vocab_size=11, block_size=4,
                             num_kv_blocks=8)  # fmt: skip


class ScriptedLink:
    """Each start() takes the next outcome: "ready" (after one poll), "exit" (dies while
    loading), or "oserror" (cannot even be created)."""

    def __init__(self, *outcomes: str) -> None:
        self.outcomes = list(outcomes)
        self.current: str | None = None
        self.polls = 0
        self.starts = 0
        self.kills = 0

    def start(self, timeout: float) -> None:
        self.starts += 1
        self.current = self.outcomes.pop(0)
        self.polls = 0
        if self.current == "oserror":
            raise OSError("fork: Cannot allocate memory")

    def poll_ready(self) -> engine_pb2.EngineInfo | None:
        self.polls += 1
        if self.polls == 1:
            return None  # still loading
        if self.current == "exit":
            raise ExecutorError("the executor exited with code 1 before it was ready")
        return INFO

    def kill(self) -> None:
        self.kills += 1


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def poll_until_settled(recovery: Recovery, max_polls: int = 10) -> list[EngineState]:
    changes = []
    for _ in range(max_polls):
        state = recovery.poll()
        if state is not None:
            changes.append(state)
    return changes


def test_a_lost_executor_is_replaced_and_serving_resumes():
    link = ScriptedLink("ready")
    recovery = Recovery(link, start_timeout=60, max_restarts=3, clock=Clock())
    assert recovery.serving and recovery.poll() is None
    assert recovery.lost("the executor exited with code -9") is EngineState.RECOVERING
    assert link.kills == 1 and link.starts == 1
    assert "code -9" in recovery.reason and "waiting for a new executor" in recovery.reason
    assert poll_until_settled(recovery) == [EngineState.SERVING]
    assert recovery.reason == "" and recovery.num_restarts == 1


def test_a_restart_that_fails_makes_the_engine_unavailable_then_retries_with_backoff():
    clock = Clock()
    link = ScriptedLink("exit", "exit", "oserror", "ready")
    recovery = Recovery(link, start_timeout=60, max_restarts=3, clock=clock, backoff=(1, 4))
    recovery.lost("step 7 ran longer than step_timeout=5s")
    assert poll_until_settled(recovery) == [EngineState.UNAVAILABLE]
    assert "exited with code 1" in recovery.reason and "next attempt in 1s" in recovery.reason
    assert link.kills == 2  # the hung one, and the one that did not start
    clock.now += 0.9
    assert poll_until_settled(recovery) == [] and link.starts == 1  # not yet
    clock.now += 0.2
    assert poll_until_settled(recovery) == [] and link.starts == 2  # failed again, no change
    assert recovery.state is EngineState.UNAVAILABLE and "next attempt in 2s" in recovery.reason
    clock.now += 2
    recovery.poll()  # a third attempt, which cannot even fork
    assert link.starts == 3 and "Cannot allocate memory" in recovery.reason
    assert "next attempt in 4s" in recovery.reason
    clock.now += 4
    assert poll_until_settled(recovery) == [EngineState.SERVING]
    assert link.starts == 4 and recovery.num_restarts == 4
    # Serving again resets the backoff: the next failure waits 1 s again.
    link.outcomes = ["exit"]
    recovery.lost("gone again")
    poll_until_settled(recovery)
    assert "next attempt in 1s" in recovery.reason


def test_executors_that_keep_dying_before_a_step_exhaust_the_restarts():
    link = ScriptedLink(*["ready"] * 4)
    recovery = Recovery(link, start_timeout=60, max_restarts=2, clock=Clock())
    for _ in range(2):
        assert recovery.lost("crashed") is EngineState.RECOVERING
        assert poll_until_settled(recovery) == [EngineState.SERVING]
    assert recovery.lost("crashed") is EngineState.UNAVAILABLE
    assert "3 executors in a row" in recovery.reason and link.starts == 2
    # A completed step in between makes each crash the first of a new run.
    recovery = Recovery(ScriptedLink(*["ready"] * 3), start_timeout=60, max_restarts=1,
                        clock=Clock())  # fmt: skip
    for _ in range(3):
        assert recovery.lost("crashed") is EngineState.RECOVERING
        poll_until_settled(recovery)
        recovery.step_completed()


def test_no_restarts_allowed_means_unavailable_at_the_first_loss():
    clock = Clock()
    link = ScriptedLink("ready")
    recovery = Recovery(link, start_timeout=60, max_restarts=0, clock=clock)
    assert recovery.lost("crashed") is EngineState.UNAVAILABLE and link.starts == 0
    clock.now += 1
    assert poll_until_settled(recovery) == [EngineState.SERVING]  # it still tries again
