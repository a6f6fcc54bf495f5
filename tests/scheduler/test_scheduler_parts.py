"""SchedulerConfig, StopConditions, Request and the policies, on their own."""

from __future__ import annotations

import pytest

from tessera.common.plan import SamplingOptions, TokenLogprobs
from tessera.scheduler import (
    FCFSPolicy,
    PriorityPolicy,
    Request,
    RequestStatus,
    Scheduler,
    SchedulerConfig,
    StopConditions,
    make_policy,
)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(num_blocks=0), r"num_blocks must be a positive int, got 0"),
        (dict(num_blocks=8, block_size=-4), r"block_size must be a positive int, got -4"),
        (dict(num_blocks=8, max_num_seqs=True), r"max_num_seqs must be a positive int, got True"),
        (dict(num_blocks=8, max_model_len=2.5), r"max_model_len must be a positive int"),
        (dict(num_blocks=8, policy="lifo"), r"policy must be one of \('fcfs', 'priority', 'lpm'\)"),
    ],
)
def test_config_rejects_bad_values(options, message):
    with pytest.raises(ValueError, match=message):
        SchedulerConfig(**options)


def test_config_defaults():
    config = SchedulerConfig(num_blocks=8)
    assert (config.block_size, config.max_num_seqs, config.policy) == (16, 256, "fcfs")
    with pytest.raises(AttributeError):
        config.num_blocks = 9  # frozen


def test_stop_conditions_reject_impossible_limits():
    with pytest.raises(ValueError, match="max_tokens must be at least 1, got 0"):
        StopConditions(max_tokens=0)
    with pytest.raises(ValueError, match=r"min_tokens must be in \[0, max_tokens=2\], got 3"):
        StopConditions(max_tokens=2, min_tokens=3)


def test_request_keeps_all_token_ids_in_step_with_outputs():
    request = Request("r", [5, 6], SamplingOptions(), StopConditions(4), output_token_ids=[7])
    assert request.all_token_ids == [5, 6, 7]
    logprobs = TokenLogprobs(8, -0.1, 1, ())
    request.append_output(8, logprobs)
    request.append_output(9, None)
    assert request.all_token_ids == [5, 6, 7, 8, 9]
    assert (request.num_tokens, request.num_prompt_tokens, request.num_output_tokens) == (5, 2, 3)
    assert request.output_logprobs == [logprobs]
    assert (request.is_finished, request.finish_reason) == (False, None)
    request.status = RequestStatus.FINISHED_LENGTH
    assert (request.is_finished, request.finish_reason) == (True, "length")


def test_policy_keys_order_requests():
    early_low = Request("a", [1], SamplingOptions(), StopConditions(1), priority=3)
    late_high = Request("b", [1], SamplingOptions(), StopConditions(1), priority=0)
    early_low.arrival_index, late_high.arrival_index = 0, 1

    def order(policy) -> list[str]:
        return [r.request_id for r in sorted([early_low, late_high], key=policy.key)]

    assert order(FCFSPolicy()) == ["a", "b"]
    assert order(PriorityPolicy()) == ["b", "a"]
    assert isinstance(make_policy("priority"), PriorityPolicy)
    with pytest.raises(ValueError, match="unknown scheduling policy 'sjf'"):
        make_policy("sjf")


@pytest.mark.parametrize("policy", ["fcfs", "priority", "lpm"])
def test_a_queue_loses_exactly_the_request_named(policy):
    """Scheduler._remove finds a request by bisection on the policy key (unique per
    request), and by a scan in a queue out of order."""
    scheduler = Scheduler(SchedulerConfig(num_blocks=8, policy=policy))
    requests = [Request(f"r{i}", [1], SamplingOptions(), StopConditions(4), priority=i % 2)
                for i in range(6)]  # fmt: skip
    for request in requests:
        scheduler.add_request(request)
    queue = list(scheduler.waiting)
    gone = [requests[3], requests[0], requests[5]]
    for request in gone:
        scheduler._remove(queue, request)
        assert request not in queue and len(queue) == len(set(queue))
    assert queue == [r for r in scheduler.waiting if r not in gone]
    shuffled = queue[::-1]
    scheduler._remove(shuffled, queue[0])
    assert shuffled == queue[1:][::-1]
