"""Async scheduling: the next plan is scheduled while one is in flight.

The scheduler counts the in-flight step's tokens as pending (known to the executor,
not yet to it). These tests pin down the edges: a pending token is never run past a
length limit, a token sampled after an EOS is dropped, and a result from before a
preemption is dropped even when the request was re-admitted in the meantime.
"""

from __future__ import annotations

from tessera.common.plan import StepResult
from tessera.scheduler import RequestStatus
from tests.scheduler.mirror_executor import MirrorExecutor
from tests.scheduler.test_scheduler_core import (
    counting_sampler,
    make_request,
    make_scheduler,
    new_ids,
    scripted_sampler,
)

EOS = 2


def test_the_next_decode_is_scheduled_while_the_token_is_pending():
    scheduler = make_scheduler()
    executor = MirrorExecutor(scheduler.config.block_size, counting_sampler)
    scheduler.add_request(make_request("a", 3))
    plan_1 = scheduler.schedule()
    assert plan_1.num_scheduled_tokens == {"a": 3}
    assert plan_1.sampling == {"a": 0}
    result_1 = executor.execute(plan_1)

    plan_2 = scheduler.schedule()  # a's first output is still on its way
    assert plan_2.num_scheduled_tokens == {"a": 1}
    assert scheduler.get_request("a").num_pending_tokens == 2
    assert scheduler.schedule().is_empty  # one step ahead at most
    result_2 = executor.execute(plan_2)  # runs the token plan_1 sampled: 103

    assert executor.last_run == {"a": [103]}
    [out_1] = scheduler.update_from_result(plan_1, result_1)
    [out_2] = scheduler.update_from_result(plan_2, result_2)
    assert (out_1.new_token_ids, out_2.new_token_ids) == ([103], [104])
    a = scheduler.get_request("a")
    assert (a.num_pending_tokens, a.num_computed_tokens, a.output_token_ids) == (0, 4, [103, 104])
    scheduler.check_invariants()
    executor.assert_mirrors(scheduler)


def test_a_pending_token_that_ends_the_request_by_length_is_not_run_past():
    scheduler = make_scheduler(max_model_len=6)
    executor = MirrorExecutor(scheduler.config.block_size, counting_sampler)
    scheduler.add_request(make_request("a", 2, max_tokens=1))  # its first token is its last
    scheduler.add_request(make_request("b", 5, max_tokens=8))  # 6 tokens fill max_model_len
    plan = scheduler.schedule()
    result = executor.execute(plan)
    assert scheduler.schedule().is_empty
    outputs = scheduler.update_from_result(plan, result)
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("a", "length"), ("b", "length")]
    assert scheduler.num_free_blocks == scheduler.config.num_blocks


def test_a_token_sampled_after_an_eos_is_dropped_and_the_request_forgotten():
    scheduler = make_scheduler()
    sample = scripted_sampler({"a": [EOS, 50, 51], "b": [60, 61, 62]})
    executor = MirrorExecutor(scheduler.config.block_size, sample)
    scheduler.add_request(make_request("a", 2, eos_token_ids=(EOS,)))
    scheduler.add_request(make_request("b", 2, eos_token_ids=(EOS,)))
    plan_1 = scheduler.schedule()
    result_1 = executor.execute(plan_1)
    plan_2 = scheduler.schedule()  # a runs once more: nobody knows of its EOS yet
    assert plan_2.num_scheduled_tokens == {"a": 1, "b": 1}
    result_2 = executor.execute(plan_2)

    outputs = scheduler.update_from_result(plan_1, result_1)
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("a", "stop"), ("b", None)]
    plan_3 = scheduler.schedule()
    assert plan_3.finished_request_ids == ["a"]  # the executor forgets it
    assert plan_3.num_scheduled_tokens == {"b": 1}
    result_3 = executor.execute(plan_3)
    outputs = scheduler.update_from_result(plan_2, result_2)
    assert [(o.request_id, o.new_token_ids) for o in outputs] == [("b", [61])]  # not a's 50
    scheduler.update_from_result(plan_3, result_3)
    assert scheduler.get_request("b").output_token_ids == [60, 61, 62]
    scheduler.check_invariants()
    executor.assert_mirrors(scheduler)


def test_a_result_from_before_a_preemption_is_dropped_though_the_request_is_back():
    config = dict(num_blocks=4, block_size=2, max_model_len=8, max_num_batched_tokens=16)
    scheduler = make_scheduler(**config, policy="priority")
    executor = MirrorExecutor(scheduler.config.block_size, counting_sampler)
    scheduler.add_request(make_request("a", 4, max_tokens=4, priority=1))
    plan_1 = scheduler.schedule()  # a: blocks 0, 1; its token 104 is pending
    result_1 = executor.execute(plan_1)
    assert result_1.sampled_token_ids == {"a": 104}

    # plan_2 gives a a third block for its next decode, then b (better priority, 2
    # blocks) finds 1 free: a is preempted, b takes 2 of the 4 blocks, and a, back
    # at the head of waiting, fits in the other 2 and is admitted again.
    scheduler.add_request(make_request("b", 3, max_tokens=2, priority=0))
    plan_2 = scheduler.schedule()
    assert new_ids(plan_2) == ["b", "a"]
    assert plan_2.finished_request_ids == ["a"]
    a = scheduler.get_request("a")
    assert (a.num_preemptions, a.num_pending_tokens, a.all_token_ids) == (1, 1, [10, 11, 12, 13])
    result_2 = executor.execute(plan_2)  # recomputes a from its prompt: 104 again

    # plan_1's token is from before the preemption: dropped, though a is running again.
    assert scheduler.update_from_result(plan_1, result_1) == []
    outputs = scheduler.update_from_result(plan_2, result_2)
    assert {o.request_id: o.new_token_ids for o in outputs} == {"b": [103], "a": [104]}
    assert a.output_token_ids == [104]
    assert a.status is RequestStatus.RUNNING
    scheduler.check_invariants()
    executor.assert_mirrors(scheduler)


def test_a_missing_pending_token_breaks_the_mirror_rule():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 2))
    plan_1 = scheduler.schedule()
    scheduler.schedule()
    try:
        scheduler.update_from_result(plan_1, StepResult())
    except RuntimeError as e:
        assert "'a': by the mirror rule a token was due" in str(e)
    else:
        raise AssertionError("a result without the due token was accepted")
