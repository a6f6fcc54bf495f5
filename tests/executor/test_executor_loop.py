"""The executor process's step loop (executor.server.Executor.serve_forever) with a fake
model runner whose steps finish only when the test says so, as on a GPU.

The loop must launch a plan that is queued behind the step in flight before it waits
for that step (the overlap async scheduling is for), unless that step is done already
(then its result goes first, so that the scheduler's turn overlaps the next layout),
and answer every plan in order:
a plan that fails to launch, or one that cannot be read, gets its error after the
results of the plans before it.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import zmq

from tessera.common.plan import NewRequestData, SamplingOptions, StepPlan, StepResult
from tessera.common.wire import decode, encode, plan_to_pb
from tessera.executor.server import Executor
from tessera.proto.tessera.v1 import engine_pb2


class FakeRunner:
    """Records submit/collect calls; a step is done once `release` is set."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.release = threading.Event()
        # Request ids whose steps are done from the second look on (the first, right
        # after submit, says not yet), once `queued` is set: a step that finishes on the
        # device while the loop waits for the next plan.
        self.finish_while_waiting: set[str] = set()
        self.queued = threading.Event()
        self.looks: dict[int, int] = {}
        self.model_config = SimpleNamespace(
            max_position_embeddings=64, vocab_size=100, eos_token_ids=[0], hidden_size=8
        )
        self.num_blocks, self.block_size = 8, 4
        self.source = SimpleNamespace(name="fake")

    def submit(self, plan: StepPlan):
        ids = list(plan.num_scheduled_tokens)
        if "bad" in ids:
            raise ValueError("no such request")
        self.calls.append(f"submit {ids[0]}")
        return SimpleNamespace(ids=ids, collected=False)

    def is_done(self, step) -> bool:
        if step.collected or self.release.is_set():
            return True
        if step.ids[0] not in self.finish_while_waiting:
            return False
        self.looks[id(step)] = looks = self.looks.get(id(step), 0) + 1
        if looks == 1:
            return False
        self.queued.wait(10)  # the next plan is in the socket by now
        step.done = True
        return True

    def collect(self, step) -> StepResult:
        if not getattr(step, "done", False):
            self.release.wait(10)  # as the real one waits for the device
        if not step.collected:
            self.calls.append(f"collect {step.ids[0]}")
            step.collected = True
        return StepResult(sampled_token_ids={rid: 7 for rid in step.ids})


def plan_for(request_id: str) -> StepPlan:
    new = NewRequestData(request_id, [1, 2], 2, SamplingOptions(), [0])
    return StepPlan(new_requests=[new], num_scheduled_tokens={request_id: 2})


@pytest.fixture
def loop():
    ctx = zmq.Context()
    scheduler, executor_end = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    scheduler.bind("inproc://executor-loop")
    executor_end.connect("inproc://executor-loop")
    runner = FakeRunner()
    executor = Executor(runner, executor_end)

    def serve():
        try:
            executor.serve_forever()
        except zmq.ContextTerminated:  # the test is over: the loop's thread closes its end
            executor_end.close(linger=0)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield scheduler, runner
    runner.release.set()
    scheduler.close(linger=0)
    ctx.term()  # wakes the loop with ContextTerminated
    thread.join(5)
    assert not thread.is_alive()


def results(scheduler: zmq.Socket, n: int) -> list[engine_pb2.StepResult]:
    out = []
    for _ in range(n):
        assert scheduler.poll(5000), "the executor sent nothing"
        out.append(decode(engine_pb2.StepResult, scheduler.recv()))
    return out


def test_a_queued_plan_is_launched_before_the_step_in_flight_is_collected(loop):
    scheduler, runner = loop
    scheduler.send(encode(plan_to_pb(plan_for("a"), 1)))
    scheduler.send(encode(plan_to_pb(plan_for("b"), 2)))
    assert not scheduler.poll(300), "a result came back before its step was done"
    runner.release.set()
    got = results(scheduler, 2)
    assert [(r.step_id, r.error) for r in got] == [(1, ""), (2, "")]
    assert runner.calls == ["submit a", "submit b", "collect a", "collect b"]


def test_failed_and_unreadable_plans_are_answered_in_order(loop):
    scheduler, runner = loop
    scheduler.send(encode(plan_to_pb(plan_for("a"), 1)))
    scheduler.send(encode(plan_to_pb(plan_for("bad"), 2)))
    scheduler.send(b"\x80\x04 not a step plan")
    scheduler.send(encode(plan_to_pb(plan_for("c"), 4)))
    runner.release.set()
    got = results(scheduler, 4)
    assert [r.step_id for r in got] == [1, 2, 0, 4]
    assert got[0].error == "" and got[3].error == ""
    assert "no such request" in got[1].error
    assert "could not read the plan" in got[2].error
    assert runner.calls.index("collect a") < runner.calls.index("submit c")


def test_a_step_done_before_the_next_plan_is_read_is_answered_first(loop):
    """A step the device finished while the loop waited (a small model: device time
    under host time): its result goes back before the next plan's layout, so the
    scheduler plans the step after while this process lays out the next one."""
    scheduler, runner = loop
    runner.finish_while_waiting.add("a")
    scheduler.send(encode(plan_to_pb(plan_for("a"), 1)))
    scheduler.send(encode(plan_to_pb(plan_for("b"), 2)))
    runner.queued.set()
    first = results(scheduler, 1)[0]  # before b is done: b's step is never released
    assert (first.step_id, first.error) == (1, "")
    runner.release.set()
    assert [r.step_id for r in results(scheduler, 1)] == [2]
    assert runner.calls == ["submit a", "collect a", "submit b", "collect b"]
