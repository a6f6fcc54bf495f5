"""Scheduler: exact plans (block ids, token counts, order) for each behaviour."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tessera.common.plan import (
    NewRequestData,
    SamplingOptions,
    StepPlan,
    StepResult,
    TokenLogprobs,
)
from tessera.scheduler import (
    Request,
    RequestOutput,
    RequestRejected,
    RequestStatus,
    Scheduler,
    SchedulerConfig,
    StopConditions,
)
from tests.scheduler.mirror_executor import MirrorExecutor


def make_scheduler(**overrides) -> Scheduler:
    options = dict(num_blocks=16, block_size=4, max_num_batched_tokens=64, max_model_len=64)
    options.update(overrides)
    return Scheduler(SchedulerConfig(**options))


def make_request(
    request_id: str,
    num_prompt: int = 2,
    max_tokens: int = 8,
    priority: int = 0,
    sampling: SamplingOptions | None = None,
    **stop,
) -> Request:
    # Prompt tokens are distinct per request, so tests can tell whose tokens ran.
    base = 10 * (ord(request_id[0]) - ord("a") + 1)
    prompt = [base + i for i in range(num_prompt)]
    return Request(
        request_id,
        prompt,
        sampling or SamplingOptions(),
        StopConditions(max_tokens=max_tokens, **stop),
        priority=priority,
    )


def counting_sampler(request_id: str, token_ids: list[int]) -> int:
    return 100 + len(token_ids)  # never an EOS in these tests


def scripted_sampler(script: dict[str, list[int]]):
    def sample(request_id: str, token_ids: list[int]) -> int:
        return script[request_id].pop(0)

    return sample


class Harness:
    """A scheduler driven by a MirrorExecutor, checked after every step."""

    def __init__(self, scheduler: Scheduler, sample=counting_sampler) -> None:
        self.scheduler = scheduler
        self.executor = MirrorExecutor(scheduler.config.block_size, sample)

    def add(self, *requests: Request) -> None:
        for request in requests:
            self.scheduler.add_request(request)

    def step(self) -> tuple[StepPlan, list[RequestOutput]]:
        plan = self.scheduler.schedule()
        result = self.executor.execute(plan)
        outputs = self.scheduler.update_from_result(plan, result)
        self.scheduler.check_invariants()
        self.executor.assert_mirrors(self.scheduler)
        return plan, outputs


def new_ids(plan: StepPlan) -> list[str]:
    return [new.request_id for new in plan.new_requests]


def cached_blocks(plan: StepPlan) -> dict[str, list[int]]:
    """Blocks appended this step to each running request scheduled (none for most: the
    plan lists only the requests that got some)."""
    listed = {c.request_id: c.new_block_ids for c in plan.cached_requests}
    assert all(listed.values()), "a request listed with no new blocks"
    new = set(new_ids(plan))
    return {rid: listed.get(rid, []) for rid in plan.num_scheduled_tokens if rid not in new}


# -- admission, batching, budgets ------------------------------------------------


def test_a_finished_request_frees_its_seat_for_a_waiting_one_next_step():
    h = Harness(make_scheduler(num_blocks=8, max_num_seqs=2))
    h.add(make_request("a", 3, max_tokens=2), make_request("b", 5, max_tokens=3))
    h.add(make_request("c", 2, max_tokens=1))

    plan, outputs = h.step()
    assert plan.num_scheduled_tokens == {"a": 3, "b": 5}
    assert [(n.request_id, n.block_ids) for n in plan.new_requests] == [("a", [0]), ("b", [1, 2])]
    assert plan.cached_requests == []
    assert [(o.request_id, o.new_token_ids, o.finished) for o in outputs] == [
        ("a", [103], False),
        ("b", [105], False),
    ]
    assert h.scheduler.num_waiting == 1  # c: max_num_seqs is 2

    plan, outputs = h.step()
    assert plan.num_scheduled_tokens == {"a": 1, "b": 1}
    assert cached_blocks(plan) == {"a": [], "b": []}  # 4 and 6 tokens fit their blocks
    assert outputs[0] == RequestOutput("a", [104], [], True, "length", None, 3, 2)
    assert h.scheduler.num_free_blocks == 6  # a's block is back at once

    plan, outputs = h.step()
    assert plan.finished_request_ids == ["a"]
    assert plan.num_scheduled_tokens == {"b": 1, "c": 2}  # running first, then new
    assert plan.new_requests[0].block_ids == [3]  # free list: 3..7, then a's 0
    assert h.executor.last_run == {"b": [106], "c": [30, 31]}
    assert [o.request_id for o in outputs if o.finished] == ["b", "c"]

    plan, outputs = h.step()
    assert plan.is_empty and outputs == []
    assert not h.scheduler.has_unfinished_requests()
    assert h.scheduler.get_request("b") is None  # finished requests are not kept
    assert h.scheduler.num_free_blocks == 8


def test_token_budget_caps_the_step_and_chunks_the_last_prompt_that_fits():
    h = Harness(make_scheduler(max_num_batched_tokens=6))
    h.add(make_request("a", 4), make_request("b", 4))

    plan, outputs = h.step()
    assert plan.num_scheduled_tokens == {"a": 4, "b": 2}
    assert [n.block_ids for n in plan.new_requests] == [[0], [1]]
    assert [o.request_id for o in outputs] == ["a"]  # b is mid-prompt: nothing sampled

    plan, outputs = h.step()
    assert plan.num_scheduled_tokens == {"a": 1, "b": 2}
    assert cached_blocks(plan) == {"a": [2], "b": []}
    assert h.executor.last_run == {"a": [104], "b": [22, 23]}
    assert [o.request_id for o in outputs] == ["a", "b"]


def test_token_budget_spent_on_decodes_leaves_waiting_requests_waiting():
    h = Harness(make_scheduler(max_num_batched_tokens=2))
    h.add(make_request("a", 1, max_tokens=2), make_request("b", 1, max_tokens=2))
    h.add(make_request("c", 1, max_tokens=2))
    assert h.step()[0].num_scheduled_tokens == {"a": 1, "b": 1}
    assert h.step()[0].num_scheduled_tokens == {"a": 1, "b": 1}  # a, b finish here
    plan, _ = h.step()
    assert plan.num_scheduled_tokens == {"c": 1}
    assert plan.finished_request_ids == ["a", "b"]


def test_max_num_seqs_caps_running_requests():
    h = Harness(make_scheduler(max_num_seqs=2))
    h.add(*(make_request(rid, 2, max_tokens=2) for rid in "abc"))
    assert new_ids(h.step()[0]) == ["a", "b"]
    plan, _ = h.step()
    assert new_ids(plan) == [] and h.scheduler.num_waiting == 1
    assert new_ids(h.step()[0]) == ["c"]


def test_long_prompt_is_prefilled_in_chunks_and_sampled_only_after_the_last():
    h = Harness(make_scheduler(max_num_batched_tokens=4))
    h.add(make_request("a", 10, max_tokens=2))
    expected_steps = [
        (4, [0], list(range(10, 14)), []),
        (4, [1], list(range(14, 18)), []),
        (2, [2], [18, 19], [110]),
        (1, [], [110], [111]),
    ]
    for num_tokens, blocks, tokens_run, sampled in expected_steps:
        plan, outputs = h.step()
        assert plan.num_scheduled_tokens == {"a": num_tokens}
        if plan.new_requests:
            assert plan.new_requests[0].block_ids == blocks
            assert plan.new_requests[0].all_token_ids == list(range(10, 20))
        else:
            assert cached_blocks(plan) == {"a": blocks}
        assert h.executor.last_run == {"a": tokens_run}
        assert [t for o in outputs for t in o.new_token_ids] == sampled
    assert outputs[0].finished and outputs[0].finish_reason == "length"


# -- policies and preemption -----------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "order"), [("fcfs", ["a", "b", "c", "d"]), ("priority", ["b", "d", "c", "a"])]
)
def test_policy_orders_admission(policy, order):
    h = Harness(make_scheduler(max_num_seqs=1, policy=policy))
    for rid, priority in zip("abcd", [2, 0, 1, 0], strict=True):
        h.add(make_request(rid, 2, max_tokens=1, priority=priority))
    assert [new_ids(h.step()[0]) for _ in range(4)] == [[rid] for rid in order]


def test_preemption_takes_the_latest_arrival_first_and_resumes_with_its_tokens():
    # max_model_len 6 caps each request at 3 blocks, so each fits the pool alone.
    # Without the prefix cache, freed blocks queue in table order (with it, cached ones
    # are evicted after the free ones: test_prefix_cache.py has that case).
    h = Harness(
        make_scheduler(num_blocks=3, block_size=2, max_model_len=6, enable_prefix_caching=False)
    )
    h.add(*(make_request(rid, 2, max_tokens=5) for rid in "abc"))

    plan, _ = h.step()
    assert [n.block_ids for n in plan.new_requests] == [[0], [1], [2]]

    # a needs a block: c (latest) goes; then b needs one, and b is now the latest.
    plan, _ = h.step()
    assert plan.num_scheduled_tokens == {"a": 1}
    assert cached_blocks(plan) == {"a": [2]}
    assert plan.finished_request_ids == ["c", "b"]
    assert [r.request_id for r in h.scheduler.waiting] == ["b", "c"]
    b = h.scheduler.get_request("b")
    assert (b.status, b.num_preemptions, b.num_computed_tokens) == (RequestStatus.WAITING, 1, 0)
    assert (b.output_token_ids, b.block_ids) == ([102], [])

    # b needs 2 blocks for its 3 tokens; FCFS waits rather than preempting a.
    for _ in range(2):
        plan, outputs = h.step()
        assert list(plan.num_scheduled_tokens) == ["a"]
    assert (outputs[0].finished, outputs[0].finish_reason) == (True, "length")

    plan, _ = h.step()
    assert plan.finished_request_ids == ["a"]
    assert plan.num_scheduled_tokens == {"b": 3}
    assert plan.new_requests[0] == NewRequestData("b", [20, 21, 102], 2, SamplingOptions(), [0, 2])
    assert h.executor.last_run == {"b": [20, 21, 102]}
    assert h.scheduler.get_request("b").output_token_ids == [102, 103]
    assert [r.request_id for r in h.scheduler.waiting] == ["c"]


def test_priority_preempts_the_lowest_priority_even_if_it_arrived_first():
    h = Harness(make_scheduler(num_blocks=2, block_size=2, max_model_len=4, policy="priority"))
    h.add(make_request("a", 2, priority=1), make_request("b", 2, priority=0))
    plan, _ = h.step()
    assert plan.num_scheduled_tokens == {"b": 2, "a": 2}
    assert [n.block_ids for n in plan.new_requests] == [[0], [1]]
    plan, _ = h.step()
    assert plan.num_scheduled_tokens == {"b": 1}
    assert cached_blocks(plan) == {"b": [1]}
    assert plan.finished_request_ids == ["a"]
    assert h.scheduler.get_request("a").num_preemptions == 1


@pytest.mark.parametrize(
    ("policy", "b_priority", "preempts"),
    [("priority", 0, True), ("priority", 1, False), ("fcfs", 0, False)],
)
def test_a_better_waiting_request_preempts_for_blocks_only_under_priority(
    policy, b_priority, preempts
):
    config = dict(num_blocks=3, block_size=2, max_model_len=6, max_num_batched_tokens=5)
    config["enable_prefix_caching"] = False  # exact ids of the plain free queue
    h = Harness(make_scheduler(**config, policy=policy))
    h.add(make_request("a", 2, max_tokens=10, priority=1))
    h.step()
    h.step()  # a holds blocks 0 and 1
    h.add(make_request("b", 5, priority=b_priority))  # needs 3 blocks, 1 is free
    plan, _ = h.step()
    if preempts:
        # a was scheduled first, then taken out, and its token went back to the budget
        assert plan.num_scheduled_tokens == {"b": 5}
        assert plan.cached_requests == []
        assert [(n.request_id, n.block_ids) for n in plan.new_requests] == [("b", [2, 0, 1])]
        assert plan.finished_request_ids == ["a"]
        a = h.scheduler.get_request("a")
        assert (a.status, a.output_token_ids) == (RequestStatus.WAITING, [102, 103])
    else:
        assert plan.num_scheduled_tokens == {"a": 1}
        assert [r.request_id for r in h.scheduler.waiting] == ["b"]


def test_a_blocked_head_is_not_skipped_by_a_request_that_would_fit():
    config = dict(num_blocks=4, block_size=2, max_model_len=8, max_num_seqs=2)
    h = Harness(make_scheduler(**config, enable_prefix_caching=False))  # exact free ids
    h.add(make_request("a", 4), make_request("b", 3), make_request("c", 1))
    assert new_ids(h.step()[0]) == ["a", "b"]  # a: [0, 1], b: [2, 3]

    plan, _ = h.step()  # a's 5th token needs a third block: b goes
    assert plan.num_scheduled_tokens == {"a": 1}
    assert cached_blocks(plan) == {"a": [2]}
    assert plan.finished_request_ids == ["b"]

    # b is back at the head (it arrived before c) and needs 2 blocks; 1 is free.
    # c would fit in it, but does not jump the queue.
    for _ in range(2):
        plan, _ = h.step()
        assert plan.num_scheduled_tokens == {"a": 1}
        assert [r.request_id for r in h.scheduler.waiting] == ["b", "c"]


def test_no_admission_in_a_step_that_preempts():
    config = dict(num_blocks=4, block_size=2, max_model_len=8, max_num_seqs=2)
    # exact ids of the plain free queue: no prefix cache
    h = Harness(make_scheduler(**config, policy="priority", enable_prefix_caching=False))
    h.add(make_request("x", 4, priority=0), make_request("y", 3, priority=5))
    assert new_ids(h.step()[0]) == ["x", "y"]  # x: [0, 1], y: [2, 3]
    h.add(make_request("w", 1, priority=1))  # waits for a seat

    # x needs a third block: y goes. w would now fit (a seat and block 3), but a
    # pool short enough to preempt admits nobody this step.
    plan, _ = h.step()
    assert plan.num_scheduled_tokens == {"x": 1}
    assert plan.finished_request_ids == ["y"]
    assert [r.request_id for r in h.scheduler.waiting] == ["w", "y"]

    plan, _ = h.step()
    assert plan.num_scheduled_tokens == {"x": 1, "w": 1}
    assert plan.new_requests[0].block_ids == [3]


# -- finishing, aborting, rejecting ----------------------------------------------


def test_finished_ids_ride_on_the_next_plan_that_runs_something():
    h = Harness(make_scheduler())
    h.add(make_request("a", 2, max_tokens=1))
    assert h.step()[1][0].finished
    empty = h.scheduler.schedule()
    assert empty.is_empty and empty.finished_request_ids == []
    h.add(make_request("b", 2))
    plan, _ = h.step()
    assert plan.finished_request_ids == ["a"]
    assert new_ids(plan) == ["b"]


def test_abort_frees_blocks_at_once_and_tells_the_executor_only_what_it_knew():
    h = Harness(make_scheduler(max_num_seqs=1))
    h.add(make_request("a", 5), make_request("b", 2))
    h.step()
    assert h.scheduler.num_used_blocks == 2
    outputs = h.scheduler.abort_requests(["a", "b", "unknown", "a"])
    assert outputs == [
        RequestOutput("a", [], [], True, "abort", None, 5, 1),
        RequestOutput("b", [], [], True, "abort", None, 2, 0),
    ]
    assert h.scheduler.num_free_blocks == 16
    assert not h.scheduler.has_unfinished_requests()
    h.scheduler.check_invariants()
    h.add(make_request("c", 2))
    plan, _ = h.step()
    assert plan.finished_request_ids == ["a"]  # b never reached the executor
    assert plan.new_requests[0].block_ids == [2]  # a's 0 and 1 queue behind 2..15


def test_a_token_for_a_request_aborted_during_the_step_is_dropped():
    h = Harness(make_scheduler())
    h.add(make_request("a"), make_request("b"))
    plan = h.scheduler.schedule()
    result = h.executor.execute(plan)
    h.scheduler.abort_requests(["a"])
    outputs = h.scheduler.update_from_result(plan, result)
    assert [o.request_id for o in outputs] == ["b"]
    h.scheduler.check_invariants()


def test_rejects_requests_that_can_never_run_with_the_numbers():
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_model_len=32)
    with pytest.raises(RequestRejected, match="request 'a': the prompt is empty"):
        scheduler.add_request(make_request("a", 0))
    with pytest.raises(
        RequestRejected,
        match="the prompt has 32 tokens, which leaves no room for output within "
        "max_model_len=32; shorten it to at most 31 tokens",
    ):
        scheduler.add_request(make_request("a", 32))
    with pytest.raises(
        RequestRejected,
        match=r"10 prompt \+ 7 output tokens need up to 17 tokens of KV cache, "
        "5 blocks of 4, but the pool has 4 blocks",
    ):
        scheduler.add_request(make_request("a", 10, max_tokens=7))
    assert scheduler.num_waiting == 0
    scheduler.add_request(make_request("a", 10, max_tokens=6))  # 16 tokens: 4 blocks
    with pytest.raises(RequestRejected, match="'a': an unfinished request has this id"):
        scheduler.add_request(make_request("a", 2))
    tight = make_scheduler(num_blocks=4, block_size=4, max_model_len=16)
    tight.add_request(make_request("b", 10, max_tokens=1000))  # capped at 16 tokens
    assert issubclass(RequestRejected, ValueError)


def test_a_finished_request_id_can_be_reused():
    h = Harness(make_scheduler())
    h.add(make_request("a", 2, max_tokens=1))
    h.step()
    h.add(make_request("a", 3, max_tokens=1))
    plan, outputs = h.step()
    assert plan.finished_request_ids == ["a"] and new_ids(plan) == ["a"]
    assert outputs[0].num_prompt_tokens == 3


# -- stop conditions -------------------------------------------------------------


@pytest.mark.parametrize(
    ("stop", "script", "reason", "stop_token_id"),
    [
        (dict(eos_token_ids=(0,)), [5, 0], "stop", 0),
        (dict(eos_token_ids=(0,), ignore_eos=True, max_tokens=3), [0, 0, 0], "length", None),
        (dict(eos_token_ids=(0,), min_tokens=3), [0, 0, 5, 0], "stop", 0),
        (dict(eos_token_ids=(0,), min_tokens=2), [5, 0], "stop", 0),
        (dict(eos_token_ids=(0,), ignore_eos=True, stop_token_ids=(7,)), [0, 7], "stop", 7),
        (dict(stop_token_ids=(7,), min_tokens=2), [7, 7], "stop", 7),
        (dict(max_tokens=2), [5, 5], "length", None),
        (dict(eos_token_ids=(0,), max_tokens=2), [5, 0], "stop", 0),  # stop wins
    ],
)
def test_stop_conditions(stop, script, reason, stop_token_id):
    max_tokens = stop.pop("max_tokens", 8)
    h = Harness(make_scheduler(), scripted_sampler({"a": list(script)}))
    h.add(make_request("a", 2, max_tokens=max_tokens, **stop))
    streamed = []
    while h.scheduler.has_unfinished_requests():
        streamed += h.step()[1]
    assert [o.new_token_ids[0] for o in streamed] == script
    assert [o.finished for o in streamed] == [False] * (len(script) - 1) + [True]
    last = streamed[-1]
    assert (last.finish_reason, last.stop_token_id) == (reason, stop_token_id)
    assert last.num_output_tokens == len(script)


def test_max_model_len_ends_a_request_before_max_tokens():
    h = Harness(make_scheduler(max_model_len=8))
    h.add(make_request("a", 6, max_tokens=10))
    streamed = h.step()[1] + h.step()[1]
    assert [(o.num_output_tokens, o.finish_reason) for o in streamed] == [(1, None), (2, "length")]


def test_logprobs_are_passed_through_when_asked_for():
    h = Harness(make_scheduler())
    h.add(make_request("a", 2, sampling=SamplingOptions(logprobs=0)), make_request("b", 2))
    _, outputs = h.step()
    assert outputs[0].new_logprobs == [TokenLogprobs(102, -0.5, 1, ())]
    assert outputs[1].new_logprobs == []
    h.step()
    assert len(h.scheduler.get_request("a").output_logprobs) == 2


# -- the contract with the executor ----------------------------------------------


def test_results_that_break_the_mirror_rule_are_refused():
    scheduler = make_scheduler(max_num_batched_tokens=2)
    scheduler.add_request(make_request("a", 2))
    scheduler.add_request(make_request("b", 3))
    plan = scheduler.schedule()  # a: whole prompt, so a token is due; b: nothing runs
    with pytest.raises(RuntimeError, match="request 'x', which this plan did not schedule"):
        scheduler.update_from_result(plan, StepResult({"x": 1}))
    with pytest.raises(RuntimeError, match="'a': .* a token was due .* returned none"):
        scheduler.update_from_result(plan, StepResult())
    assert scheduler.get_request("a").output_token_ids == []


def test_scheduler_imports_no_torch():
    code = "import sys, scheduler; sys.exit(any(m.split('.')[0] == 'torch' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
