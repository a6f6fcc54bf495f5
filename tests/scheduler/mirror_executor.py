"""A fake executor for scheduler tests.

It knows requests only through the plans it runs, applies the mirror rule of
executor.plan as a real executor would, and checks each plan on the way: every
scheduled request appears once (running ones first, those that got blocks listed in
cached_requests), tokens to run exist, block tables have room for them, and no block
is written while another table holds it.

It also keeps a model of the KV pool: each slot holds the context (every token up to
and including its own) whose K/V a real model would have written there, and a
request that samples must find its whole context in its block table. So a prefix
served from the cache must be exactly the K/V this executor computed for those
tokens, and one computed by an earlier executor (lost since) is not there at all.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from tessera.common.plan import SamplingOptions, StepPlan, StepResult, TokenLogprobs
from tessera.scheduler import Scheduler

# (request_id, all token ids so far) -> the next token
Sampler = Callable[[str, list[int]], int]


def sample_from_context(request_id: str, token_ids: list[int]) -> int:
    """A deterministic "greedy model": the next token depends on the tokens alone."""
    return (sum(token_ids) * 31 + len(token_ids) * 7) % 11


@dataclass
class Mirror:
    token_ids: list[int]
    num_prompt_tokens: int
    sampling: SamplingOptions
    block_ids: list[int]
    num_computed_tokens: int
    embed: bool = False
    # contexts[p]: a key of token_ids[: p + 1], what the K/V at position p depends on
    contexts: list[int] = field(default_factory=list)

    def context(self, position: int) -> int:
        while len(self.contexts) <= position:
            previous = self.contexts[-1] if self.contexts else 0
            self.contexts.append(hash((previous, self.token_ids[len(self.contexts)])))
        return self.contexts[position]


class MirrorExecutor:
    def __init__(self, block_size: int, sample: Sampler = sample_from_context) -> None:
        self.block_size = block_size
        self.sample = sample
        self.mirrors: dict[str, Mirror] = {}
        self.last_run: dict[str, list[int]] = {}  # request_id -> tokens run last step
        self.kv: dict[int, int] = {}  # slot -> the context whose K/V it holds

    def execute(self, plan: StepPlan) -> StepResult:
        for request_id in plan.finished_request_ids:
            assert request_id in self.mirrors, f"told to forget unknown {request_id}"
            del self.mirrors[request_id]
        for new in plan.new_requests:
            assert new.request_id not in self.mirrors, f"{new.request_id} is known"
            self.mirrors[new.request_id] = Mirror(
                list(new.all_token_ids),
                new.num_prompt_tokens,
                new.sampling,
                list(new.block_ids),
                new.num_computed_tokens,
                new.embed,
            )
            assert not new.embed or new.num_computed_tokens == 0, "an embed reused a prefix"
        for cached in plan.cached_requests:
            assert cached.new_block_ids, f"{cached.request_id} listed with no new blocks"
            self.mirrors[cached.request_id].block_ids.extend(cached.new_block_ids)
        # Batch order: the running requests (listed in cached_requests only when they
        # get blocks, in the same order), then the new ones.
        new_ids = [n.request_id for n in plan.new_requests]
        scheduled = list(plan.num_scheduled_tokens)
        running = scheduled[: len(scheduled) - len(new_ids)]
        assert scheduled[len(running) :] == new_ids, "plan lists disagree"
        assert not set(running) & set(new_ids), "plan lists disagree"
        with_blocks = [c.request_id for c in plan.cached_requests]
        assert [r for r in running if r in set(with_blocks)] == with_blocks, "plan lists disagree"
        owners = Counter(b for m in self.mirrors.values() for b in m.block_ids)
        return self._run(plan, owners)

    def _run(self, plan: StepPlan, owners: Counter[int]) -> StepResult:
        result = StepResult()
        self.last_run = {}
        for request_id, num_scheduled in plan.num_scheduled_tokens.items():
            mirror = self.mirrors[request_id]
            start = mirror.num_computed_tokens
            end = start + num_scheduled
            assert 0 < num_scheduled and end <= len(mirror.token_ids), "no such tokens"
            assert end <= len(mirror.block_ids) * self.block_size, "no slots for them"
            for position in range(start, end):
                block_id = mirror.block_ids[position // self.block_size]
                assert owners[block_id] == 1, f"{request_id} writes shared block {block_id}"
                self.kv[self._slot(mirror, position)] = mirror.context(position)
            self.last_run[request_id] = mirror.token_ids[start:end]
            mirror.num_computed_tokens = end
            if end == len(mirror.token_ids):
                for position in range(end):  # attention reads the whole context
                    found = self.kv.get(self._slot(mirror, position))
                    assert found == mirror.context(position), (
                        f"{request_id}: wrong K/V at position {position}"
                    )
                if mirror.embed:  # a stand-in vector: (length, sum) of the prompt
                    result.embeddings[request_id] = [
                        float(len(mirror.token_ids)), float(sum(mirror.token_ids))
                    ]
                    continue
                token_id = self.sample(request_id, mirror.token_ids)
                mirror.token_ids.append(token_id)
                result.sampled_token_ids[request_id] = token_id
                if mirror.sampling.logprobs is not None:
                    result.logprobs[request_id] = TokenLogprobs(token_id, -0.5, 1, ())
        return result

    def _slot(self, mirror: Mirror, position: int) -> int:
        block_id = mirror.block_ids[position // self.block_size]
        return block_id * self.block_size + position % self.block_size

    def assert_mirrors(self, scheduler: Scheduler) -> None:
        """Every running request is mirrored with the same tokens (and the ones it
        sampled in a step whose result the scheduler has not seen), progress, blocks."""
        for request in scheduler.running:
            mirror = self.mirrors[request.request_id]
            num_known = request.num_tokens
            assert mirror.token_ids[:num_known] == request.all_token_ids
            assert len(mirror.token_ids) == num_known + request.num_pending_tokens
            assert mirror.num_computed_tokens == request.num_computed_tokens
            assert mirror.block_ids == request.block_ids


class InstantLink:
    """The ExecutorLink interface that SchedulerServer uses, for tests: each plan runs on
    a MirrorExecutor as it is submitted, and poll_result hands the results back oldest
    first, as the real link does with two plans in flight."""

    def __init__(self, ctx: zmq.Context, block_size: int) -> None:
        self.mirror = MirrorExecutor(block_size)
        self.socket = ctx.socket(zmq.PAIR)  # never readable: results are there at once
        self.results: deque[StepResult] = deque()

    def submit(self, plan: StepPlan) -> None:
        self.results.append(self.mirror.execute(plan))

    def poll_result(self) -> StepResult | None:
        return self.results.popleft() if self.results else None

    def check_alive(self) -> None:
        pass
