"""Scheduler under random add / abort / step sequences, against simple oracles.

The fake executor samples from the tokens alone (a deterministic "greedy model"), so
a request must stream the same tokens however it was batched, chunked or preempted, or
recomputed on a new executor after one was lost, and whether steps ran one at a time or
pipelined (the next plan scheduled while one is in flight): the ones it would produce
running alone. With the prefix cache, requests share prompts (a conversation's next
turn, n > 1 copies, salts): the fake executor models the K/V each slot holds and
checks that every request attends to exactly its own context, cached prefix included.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tessera.common.plan import SamplingOptions, StepPlan, StepResult
from tessera.scheduler import (
    Request,
    RequestOutput,
    RequestRejected,
    Scheduler,
    SchedulerConfig,
    StopConditions,
)
from tests.scheduler.mirror_executor import MirrorExecutor, sample_from_context

EOS = 0
MAX_DRAIN_STEPS = 5_000


def run_alone(request: Request, max_model_len: int) -> tuple[list[int], str]:
    """The outputs and finish reason of a request that never shares the device."""
    stop = request.stop
    tokens = list(request.prompt_token_ids)
    outputs: list[int] = []
    while True:
        token_id = sample_from_context(request.request_id, tokens)
        tokens.append(token_id)
        outputs.append(token_id)
        stops = token_id in stop.stop_token_ids or (
            not stop.ignore_eos and token_id in stop.eos_token_ids
        )
        if len(outputs) >= stop.min_tokens and stops:
            return outputs, "stop"
        if len(outputs) >= stop.max_tokens or len(tokens) >= max_model_len:
            return outputs, "length"


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        # Small pools, so that requests contend for blocks and get preempted.
        num_blocks=st.integers(2, 10),
        block_size=st.integers(1, 3),
        max_num_seqs=st.integers(1, 6),
        max_num_batched_tokens=st.integers(1, 16),
        max_model_len=st.integers(2, 24),
        policy=st.sampled_from(["fcfs", "priority", "priority", "lpm"]),
        enable_prefix_caching=st.sampled_from([True, True, False]),
    )
    def setup(self, **options) -> None:
        self.scheduler = Scheduler(SchedulerConfig(**options))
        self.executor = MirrorExecutor(self.scheduler.config.block_size)
        self.requests: dict[str, Request] = {}  # every accepted request, by id
        self.streams: dict[str, list[RequestOutput]] = {}
        self.count = 0
        # A step submitted and run by the executor whose result the scheduler has not
        # seen yet (pipelined steps): its tokens are pending.
        self.in_flight: tuple[StepPlan, StepResult] | None = None

    @rule(
        prompt=st.lists(st.integers(0, 10), max_size=12),
        max_tokens=st.integers(1, 16),
        min_tokens=st.integers(0, 3),
        priority=st.integers(0, 3),
        ignore_eos=st.booleans(),
        stop_token_ids=st.lists(st.integers(1, 10), max_size=2).map(tuple),
    )
    def add(self, prompt, max_tokens, min_tokens, priority, ignore_eos, stop_token_ids):
        self._add(prompt, max_tokens, min_tokens, priority, ignore_eos, stop_token_ids)

    @rule(
        data=st.data(),
        extra=st.lists(st.integers(0, 10), max_size=4),
        copies=st.integers(1, 3),
        same_salt=st.sampled_from([True, True, False]),
        max_tokens=st.integers(1, 8),
    )
    def add_sharing(self, data, extra, copies, same_salt, max_tokens) -> None:
        """Prompts that start like an earlier request's tokens (outputs included: the
        next turn of a conversation), alone or as the n copies of one request."""
        if not self.requests:
            return
        earlier = data.draw(st.sampled_from(list(self.requests.values())))
        tokens = earlier.all_token_ids
        prompt = tokens[: data.draw(st.just(len(tokens)) | st.integers(0, len(tokens)))] + extra
        salt = earlier.cache_salt if same_salt else earlier.cache_salt + "x"
        for _ in range(copies):
            self._add(prompt, max_tokens, 0, 0, True, (), salt)

    def _add(
        self, prompt, max_tokens, min_tokens, priority, ignore_eos, stop_token_ids, salt=""
    ) -> None:
        self.count += 1
        stop = StopConditions(
            max_tokens,
            min(min_tokens, max_tokens),
            stop_token_ids,
            (EOS,),
            ignore_eos,
        )
        request = Request(
            f"r{self.count}", list(prompt), SamplingOptions(), stop, priority, cache_salt=salt
        )
        config = self.scheduler.config
        num_tokens = min(len(prompt) + max_tokens, config.max_model_len)
        fits = -(-num_tokens // config.block_size) <= config.num_blocks
        valid = 0 < len(prompt) < config.max_model_len and fits
        try:
            self.scheduler.add_request(request)
        except RequestRejected:
            assert not valid
            return
        assert valid
        self.requests[request.request_id] = request
        self.streams[request.request_id] = []

    @rule(data=st.data())
    def add_duplicate(self, data) -> None:
        live = [r for r in self.requests.values() if not r.is_finished]
        if not live:
            return
        original = data.draw(st.sampled_from(live))
        copy = Request(original.request_id, [1], SamplingOptions(), StopConditions(1))
        try:
            self.scheduler.add_request(copy)
        except RequestRejected:
            return
        raise AssertionError("a duplicate id was accepted")

    @rule(data=st.data())
    def abort(self, data) -> None:
        ids = data.draw(st.lists(st.sampled_from([*self.requests, "unknown"]), max_size=3))
        live = {i for i in ids if i in self.requests and not self.requests[i].is_finished}
        outputs = self.scheduler.abort_requests(ids)
        assert sorted(o.request_id for o in outputs) == sorted(live)
        self._record(outputs)

    @rule(num_steps=st.integers(1, 4))
    def steps(self, num_steps: int) -> None:
        for _ in range(num_steps):
            self.step()

    @rule(num_steps=st.integers(1, 6))
    def pipelined_steps(self, num_steps: int) -> None:
        for _ in range(num_steps):
            self.step_ahead()

    @rule()
    def reset_prefix_cache(self) -> None:
        self.scheduler.reset_prefix_cache()
        assert self.scheduler.num_cached_blocks == 0

    @rule(with_a_step_in_flight=st.booleans())
    def lose_the_executor(self, with_a_step_in_flight: bool) -> None:
        """The executor dies: a plan it was running never comes back, and a new one
        mirrors nothing. Every stream must go on as if nothing happened."""
        if with_a_step_in_flight:
            self.scheduler.schedule()
        self.in_flight = None
        self.scheduler.requeue_running()
        self.executor = MirrorExecutor(self.scheduler.config.block_size)

    def step_ahead(self) -> None:
        """Schedule and run the next plan, then hand the scheduler the previous one's
        result: the executor is one step ahead of the scheduler's bookkeeping."""
        plan = self.scheduler.schedule()
        self.scheduler.check_invariants()  # with two plans in flight: nothing runs too far
        assert self.scheduler.config.max_num_seqs >= len(plan.num_scheduled_tokens)
        assert plan.total_num_scheduled_tokens <= self.scheduler.config.max_num_batched_tokens
        ahead = None if plan.is_empty else (plan, self.executor.execute(plan))
        if self.in_flight is not None:
            self._record(self.scheduler.update_from_result(*self.in_flight))
        self.in_flight = ahead

    def step(self) -> None:
        if self.in_flight is not None:
            self._record(self.scheduler.update_from_result(*self.in_flight))
            self.in_flight = None
        plan = self.scheduler.schedule()
        if plan.is_empty:
            assert not self.scheduler.running  # nothing to run means nothing running
            return
        assert len(plan.num_scheduled_tokens) <= self.scheduler.config.max_num_seqs
        budget = self.scheduler.config.max_num_batched_tokens
        assert plan.total_num_scheduled_tokens <= budget
        result = self.executor.execute(plan)
        self._record(self.scheduler.update_from_result(plan, result))

    def _record(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self.streams[output.request_id]
            assert not (stream and stream[-1].finished), "output after the last one"
            stream.append(output)
            request = self.requests[output.request_id]
            assert output.finished == request.is_finished
            assert output.num_output_tokens == request.num_output_tokens

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "scheduler"):
            return
        self.scheduler.check_invariants()
        self.executor.assert_mirrors(self.scheduler)
        for request in self.requests.values():
            if request.is_finished:
                assert self.scheduler.get_request(request.request_id) is None

    def teardown(self) -> None:
        if not hasattr(self, "scheduler"):
            return
        for _ in range(MAX_DRAIN_STEPS):
            if not self.scheduler.has_unfinished_requests():
                break
            self.step()
            self.consistent()
        else:
            raise AssertionError("requests never finished: the scheduler is stuck")
        assert self.scheduler.num_free_blocks == self.scheduler.config.num_blocks
        if not self.scheduler.config.enable_prefix_caching:
            assert self.scheduler.num_cached_blocks == self.scheduler.num_prefix_cache_hits == 0
        for request_id, request in self.requests.items():
            self._check_stream(request, self.streams[request_id])

    def _check_stream(self, request: Request, stream: list[RequestOutput]) -> None:
        tokens = [t for output in stream for t in output.new_token_ids]
        assert tokens == request.output_token_ids
        assert stream and stream[-1].finished
        expected, reason = run_alone(request, self.scheduler.config.max_model_len)
        if stream[-1].finish_reason == "abort":
            assert tokens == expected[: len(tokens)]
        else:
            assert (tokens, stream[-1].finish_reason) == (expected, reason)


SchedulerMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=30, deadline=None
)
test_scheduler_machine = SchedulerMachine.TestCase
