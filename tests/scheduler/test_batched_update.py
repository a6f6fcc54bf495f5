"""The per-step loops that issue 22 tightened (``_schedule_running``,
``update_from_result``) against the per-sequence code they replaced, kept here as the
reference: on random workloads (async steps, preemption in small pools, shared prefixes,
stops, logprobs, aborts, lost executors) both give the same plans, outputs and state,
except that a plan now lists a running request's blocks only when it gets new ones, and
registers a step's blocks in the prefix cache only when the step completes one. Each
side runs on its own mirror executor, which checks every plan it is given (a new one,
after a loss, knows no table: every table must come whole again)."""

from __future__ import annotations

import dataclasses
import random

import pytest

from tessera.common.plan import (
    CachedRequestData,
    SamplingOptions,
    StepPlan,
    StepResult,
    StopConditions,
)
from tessera.scheduler import Request, RequestOutput, Scheduler, SchedulerConfig
from tessera.scheduler.request import RequestStatus
from tessera.scheduler.scheduler import MAX_PENDING_TOKENS, _output
from tests.scheduler.mirror_executor import MirrorExecutor

EOS = 0


class PerSequenceScheduler(Scheduler):
    """The scheduler as it was before issue 22: one call per request for everything."""

    def _schedule_running(self, plan: StepPlan, budget: int) -> tuple[int, bool]:
        preempted = False
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_known = request.num_tokens + request.num_pending_tokens
            num_new = min(num_known - request.num_computed_tokens, budget)
            pending = request.num_pending_tokens
            if (
                num_new == 0
                or pending >= MAX_PENDING_TOKENS
                or (pending and self._reference_pending_ends(request))
            ):
                index += 1
                continue
            while (new_block_ids := self.kv_cache.allocate_slots(request, num_new)) is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            if new_block_ids is None:
                break
            plan.cached_requests.append(CachedRequestData(request.request_id, new_block_ids))
            self._commit(plan, request, num_new)
            budget -= num_new
            index += 1
        return budget, preempted

    def _reference_pending_ends(self, request: Request) -> bool:
        num_outputs = request.num_output_tokens + request.num_pending_tokens
        num_tokens = request.num_tokens + request.num_pending_tokens
        return num_outputs >= request.stop.max_tokens or num_tokens >= self.config.max_model_len

    def update_from_result(self, plan: StepPlan, result: StepResult) -> list[RequestOutput]:
        self._check_result(plan, result)
        for request_id, (num_preemptions, num_computed) in plan.num_computed_after.items():
            request = self._requests.get(request_id)
            if (
                request is not None
                and request.status is RequestStatus.RUNNING
                and request.num_preemptions == num_preemptions
            ):
                self.kv_cache.register_computed(request, num_computed)
        outputs = []
        for request_id, token_id in result.sampled_token_ids.items():
            request = self._requests.get(request_id)
            if (
                request is None
                or request.status is not RequestStatus.RUNNING
                or request.num_preemptions != plan.sampling[request_id]
            ):
                continue
            request.num_pending_tokens -= 1
            logprobs = result.logprobs.get(request_id)
            request.append_output(token_id, logprobs)
            status = self._stop_status(request, token_id)
            if status is not None:
                self._finish(request, status)
            new_logprobs = [] if logprobs is None else [logprobs]
            outputs.append(_output(request, [token_id], new_logprobs))
        return outputs


def state(scheduler: Scheduler) -> dict:
    """Everything a step leaves behind that the two must agree on."""
    requests = {
        r.request_id: (
            list(r.all_token_ids), list(r.output_token_ids), list(r.output_logprobs),
            r.num_computed_tokens, r.num_pending_tokens, list(r.block_ids), r.status,
            r.num_registered_blocks, list(r.block_hashes), r.num_preemptions,
            r.stop_token_id, r.num_cached_tokens,
        )
        for r in [*scheduler.waiting, *scheduler.running]
    }  # fmt: skip
    pool = scheduler.kv_cache.pool
    return {
        "requests": requests,
        "waiting": [r.request_id for r in scheduler.waiting],
        "running": [r.request_id for r in scheduler.running],
        "pool": (pool.num_free_blocks, pool.num_used_blocks, pool.num_cached_blocks),
        "preemptions": scheduler.num_preemptions,
        "prefix": (scheduler.num_prefix_cache_queries, scheduler.num_prefix_cache_hits),
    }


def check_same_plan(new: StepPlan, old: StepPlan) -> None:
    assert new.new_requests == old.new_requests
    assert list(new.num_scheduled_tokens.items()) == list(old.num_scheduled_tokens.items())
    assert new.finished_request_ids == old.finished_request_ids
    assert new.sampling == old.sampling
    # Only the requests that got blocks are listed, in the same order.
    assert new.cached_requests == [c for c in old.cached_requests if c.new_block_ids]
    # Registrations the new plan leaves out are ones that would not cache a block:
    # state() after the result shows the same cache either way.
    assert new.num_computed_after.items() <= old.num_computed_after.items()


def random_request(rng: random.Random, index: int, earlier: list[list[int]]) -> Request:
    if earlier and rng.random() < 0.4:  # a prefix someone computed: a cache hit
        base = rng.choice(earlier)
        prompt = base[: rng.randint(1, len(base))] + [rng.randint(1, 10)]
    else:
        prompt = [rng.randint(0, 10) for _ in range(rng.randint(1, 14))]
    max_tokens = rng.randint(1, 12)
    stop = StopConditions(
        max_tokens=max_tokens,
        min_tokens=rng.randint(0, min(2, max_tokens)),
        stop_token_ids=tuple(rng.sample(range(1, 11), rng.randint(0, 2))),
        eos_token_ids=(EOS,),
        ignore_eos=rng.random() < 0.5,
    )
    sampling = SamplingOptions(logprobs=rng.choice([None, None, 0, 2]))
    return Request(f"r{index}", prompt, sampling, stop, priority=rng.randint(0, 2))


@pytest.mark.parametrize("token_rows", [False, True], ids=["outputs", "token_rows"])
@pytest.mark.parametrize("seed", range(40))
def test_batched_loops_match_the_per_sequence_ones(seed, token_rows):
    """With token_rows, the running rows come as tuples (the scheduler process's
    path): the same outputs as the reference's, split in two."""
    rng = random.Random(seed)
    config = SchedulerConfig(
        num_blocks=rng.randint(6, 24),
        block_size=rng.choice([1, 2, 4]),
        max_num_seqs=rng.randint(1, 8),
        max_num_batched_tokens=rng.randint(4, 24),
        max_model_len=rng.randint(16, 40),
        policy=rng.choice(["fcfs", "priority", "lpm"]),
        enable_prefix_caching=rng.random() < 0.7,
    )
    new, old = Scheduler(config), PerSequenceScheduler(config)
    executors = [MirrorExecutor(config.block_size), MirrorExecutor(config.block_size)]
    in_flight: list[tuple[StepPlan, StepPlan, StepResult, StepResult]] = []
    earlier: list[list[int]] = []
    num_outputs = num_blocks_listed = 0
    for step in range(150):
        for k in range(rng.choice([0, 0, 1, 2]) if step < 110 else 0):
            request = random_request(rng, step * 4 + k, earlier)
            try:
                new.check_admissible(request)
            except ValueError:
                continue
            old.add_request(request)
            new.add_request(_copy(request))
            earlier.append(list(request.prompt_token_ids))
        if rng.random() < 0.05 and new.running:  # a gateway's abort
            ids = [rng.choice(new.running).request_id]
            assert new.abort_requests(ids) == old.abort_requests(ids)
        if rng.random() < 0.02:  # the executor is lost with what is in flight
            assert new.requeue_running() == old.requeue_running()
            executors = [MirrorExecutor(config.block_size), MirrorExecutor(config.block_size)]
            in_flight.clear()
        plan_new, plan_old = new.schedule(), old.schedule()
        check_same_plan(plan_new, plan_old)
        num_blocks_listed += len(plan_new.cached_requests)
        if not plan_new.is_empty:
            # The reference's plan, as the mirror executor accepts it (it refuses entries
            # without blocks: check_same_plan showed they are all the two differ in).
            listed = [c for c in plan_old.cached_requests if c.new_block_ids]
            sent_old = dataclasses.replace(plan_old, cached_requests=listed)
            results = [executors[0].execute(plan_new), executors[1].execute(sent_old)]
            assert results[0] == results[1]
            in_flight.append((plan_new, plan_old, *results))
        if in_flight and (len(in_flight) == 2 or plan_new.is_empty):
            plan_new, plan_old, result_new, result_old = in_flight.pop(0)
            expected = old.update_from_result(plan_old, result_old)
            if token_rows:
                rows: dict[str, tuple[int, int, int, int]] = {}
                outputs = new.update_from_result(plan_new, result_new, rows)
                assert_split(outputs, rows, expected)
            else:
                outputs = new.update_from_result(plan_new, result_new)
                assert outputs == expected
            num_outputs += len(expected)
        assert state(new) == state(old)
        new.check_invariants()
        executors[0].assert_mirrors(new)
    assert num_outputs >= 10 and num_blocks_listed > 0  # the workload did something


def assert_split(
    outputs: list[RequestOutput],
    rows: dict[str, tuple[int, int, int, int]],
    expected: list[RequestOutput],
) -> None:
    """``expected``, as update_from_result splits it with token_rows: the rows of
    requests that run on with one token and no logprobs as tuples, in order; the rest
    as outputs, in order."""
    plain = [o for o in expected if not o.finished and not o.new_logprobs]
    assert outputs == [o for o in expected if o.finished or o.new_logprobs]
    assert list(rows.items()) == [
        (o.request_id, (*o.new_token_ids, o.num_prompt_tokens, o.num_output_tokens,
                        o.num_cached_tokens))
        for o in plain
    ]  # fmt: skip
    assert all(len(o.new_token_ids) == 1 and o.embedding is None for o in plain)


def _copy(request: Request) -> Request:
    return Request(
        request.request_id,
        list(request.prompt_token_ids),
        request.sampling,
        request.stop,
        request.priority,
        request.cache_salt,
    )
