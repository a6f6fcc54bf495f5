"""The scheduler: which tokens of which requests run in the next step.

Owns the waiting and running queues, every unfinished request's progress, and (through
the KV cache manager) the block pool. One step:

    plan = scheduler.schedule()                      # StepPlan for the executor
    result = executor.execute(plan)                  # StepResult
    outputs = scheduler.update_from_result(plan, result)

Both sides follow the mirror rule of executor.plan: the scheduler advances
num_computed_tokens when it schedules tokens and appends a sampled token when it comes
back. The executor mirrors exactly the running requests, so a request leaving the
running queue (finished, aborted, preempted) is named in finished_request_ids of the
next plan that schedules tokens. An empty plan carries none: the caller may skip it.

The loop may also run one step ahead (async scheduling): schedule() again while a
plan is in flight, then update_from_result for the older plan, so the executor never
waits for the scheduler's bookkeeping:

    plan_1 = schedule(); submit(plan_1)
    plan_2 = schedule(); submit(plan_2)       # plan_1's tokens count as pending
    update_from_result(plan_1, collect());  plan_3 = schedule(); submit(plan_3) ...

A request whose token is pending is scheduled for its next decode as if the token
were known (the executor has it by then). A pending token that would end the request
by length is not run past; one that ends it by EOS costs one wasted decode row, whose
token is dropped. A request runs at most one step ahead (MAX_PENDING_TOKENS): a third
schedule() with two plans in flight schedules nothing new for it.

With the prefix cache (config.enable_prefix_caching; kv_cache_manager has the rules),
admission starts a request past its longest cached prefix, and only the tokens left
to compute count against the token budget. The full blocks a step computes are
registered in the cache when its result comes back (update_from_result), never when
it is scheduled, so a hit never names K/V that a failed or lost step did not write. A
waiting request whose next block to compute is being computed by a step in flight
waits for it (the head waits, as for blocks), so the sequences of an n > 1 request,
or prompts sharing a system prompt that arrive together, compute it once.

Embed requests (request.embed) share the batch: their prompts are admitted and chunked
under the same budget as any prefill, and the step of the last prompt position counts
as the one that "samples" (plan.sampling); its result carries the pooled vector
instead of a token, and the request finishes there. They never start from a cached
prefix (the pooled mean needs every position's hidden state), but the full blocks they
compute are registered for the requests that follow.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import Counter
from collections.abc import Iterable

from tessera.common.plan import (
    CachedRequestData,
    NewRequestData,
    StepPlan,
    StepResult,
    TokenLogprobs,
)
from tessera.scheduler.block_pool import BlockPool
from tessera.scheduler.config import SchedulerConfig
from tessera.scheduler.kv_cache_manager import KVCacheManager
from tessera.scheduler.outputs import RequestOutput, TokenRow
from tessera.scheduler.policy import LPM_MAX_OVERTAKEN, LPM_WINDOW, make_policy
from tessera.scheduler.request import Request, RequestStatus

# Tokens of one request that steps in flight may sample before the scheduler sees
# them: one per plan in flight, and the loop keeps at most two in flight (one running,
# one queued behind it).
MAX_PENDING_TOKENS = 2


class RequestRejected(ValueError):
    """A request this scheduler can never run; the message says why and what to change."""


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.policy = make_policy(config.policy)
        self.kv_cache = KVCacheManager(
            BlockPool(config.num_blocks), config.block_size, config.enable_prefix_caching
        )
        self.waiting: list[Request] = []  # sorted by policy key
        self.running: list[Request] = []  # sorted by policy key
        self._requests: dict[str, Request] = {}  # every unfinished request
        self._finished_ids: list[str] = []  # for the next plan that schedules tokens
        self._next_arrival_index = 0
        self.num_preemptions = 0  # since start, for metrics and tests
        # Prefix cache, since start: tokens of admitted requests looked up, and those
        # found (served from the cache instead of computed).
        self.num_prefix_cache_queries = 0
        self.num_prefix_cache_hits = 0

    # -- requests in and out -----------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request, or raise RequestRejected if it could never run."""
        self.check_admissible(request)
        request.arrival_index = self._next_arrival_index
        self._next_arrival_index += 1
        # The per-step loops compare with this one bound, not with two.
        request.max_num_tokens = min(request.max_num_tokens, self.config.max_model_len)
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        insort(self.waiting, request, key=self.policy.key)

    def abort_requests(self, request_ids: Iterable[str]) -> list[RequestOutput]:
        """Finish the given requests now and free their blocks; unknown ids are skipped."""
        outputs = []
        for request_id in request_ids:
            request = self._requests.get(request_id)
            if request is not None:
                self._finish(request, RequestStatus.FINISHED_ABORTED)
                outputs.append(_output(request, [], []))
        return outputs

    def requeue_running(self) -> int:
        """The executor was lost, and the step in flight with it: send every running
        request back to waiting, to be recomputed as after a preemption (its outputs
        kept, its blocks free). The next executor mirrors nothing, so there is nothing
        for it to forget; and its KV memory is new, so the prefix cache is emptied
        too (reset_prefix_cache). Returns how many requests went back."""
        for request in self.running:
            self.kv_cache.free(request)
            request.num_computed_tokens = 0
            request.num_pending_tokens = 0
            request.status = RequestStatus.WAITING
            insort(self.waiting, request, key=self.policy.key)
        num_requeued = len(self.running)
        self.running = []
        self._finished_ids = []
        self.reset_prefix_cache()
        return num_requeued

    def reset_prefix_cache(self) -> int:
        """Forget every cached block (an executor restart, or an admin's reset): no
        request admitted from now on hits K/V computed before. Running requests keep
        their blocks; full blocks that steps now in flight compute are still cached
        when those come back. Returns how many blocks were cached."""
        return self.kv_cache.reset_prefix_cache()

    # -- the step ----------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.config.max_num_batched_tokens
        budget, preempted = self._schedule_running(plan, budget)
        if not preempted:
            # A pool short enough to preempt has no room for newcomers: they would
            # only take blocks that the running requests need next step.
            self._schedule_waiting(plan, budget)
        if not plan.is_empty:
            plan.finished_request_ids, self._finished_ids = self._finished_ids, []
        return plan

    def update_from_result(
        self, plan: StepPlan, result: StepResult, token_rows: dict[str, TokenRow] | None = None
    ) -> list[RequestOutput]:
        """Cache the full blocks the step computed, append sampled tokens, finish
        requests that hit a stop, report each token.

        With ``token_rows``, the outputs of the requests that run on with one new token
        and nothing else to report (no stop, no logprobs: nearly all of them, every
        step) go there instead of into the list, as request id -> (token id, prompt
        tokens, output tokens, cached tokens), without an object each (the scheduler
        process's hot path: common/wire.TokenColumnsBuilder.add_token_rows); the list
        then has only the other outputs, in the same order as without.

        Runs once per step over every sampled request: the loop reads each request
        once, and calls out only for the rare cases (a block to cache, a stop)."""
        self._check_result(plan, result)
        requests = self._requests
        running_status = RequestStatus.RUNNING
        if plan.num_computed_after:
            block_size = self.config.block_size
            register_computed = self.kv_cache.register_computed
            for request_id, (num_preemptions, num_computed) in plan.num_computed_after.items():
                request = requests.get(request_id)
                if (
                    request is not None
                    and request.status is running_status
                    and request.num_preemptions == num_preemptions
                    # else its blocks went back while the step ran: not its own now
                    and min(num_computed, request.num_tokens) // block_size
                    > request.num_registered_blocks  # a full block not cached yet
                ):
                    register_computed(request, num_computed)
        outputs = []
        for request_id, vector in result.embeddings.items():
            request = self._current(plan, request_id)
            if request is None:
                continue  # aborted or preempted while the step ran
            request.num_pending_tokens -= 1
            request.embedding = vector
            self._finish(request, RequestStatus.FINISHED_STOPPED)
            outputs.append(_output(request, [], []))
        plan_sampling = plan.sampling
        all_logprobs = result.logprobs
        for request_id, token_id in result.sampled_token_ids.items():
            request = requests.get(request_id)
            if (
                request is None
                or request.status is not running_status
                or request.num_preemptions != plan_sampling[request_id]
            ):
                continue  # aborted or preempted while the step ran
            request.num_pending_tokens -= 1
            logprobs = all_logprobs.get(request_id) if all_logprobs else None
            if logprobs is None:  # as request.append_output, inline
                request.output_token_ids.append(token_id)
                request.all_token_ids.append(token_id)
                request.num_tokens = num_tokens = request.num_tokens + 1
            else:
                request.append_output(token_id, logprobs)
                num_tokens = request.num_tokens
            if (
                # Cheap tests that every stop passes (a stop or EOS id, max_tokens or
                # max_model_len); _stop_status decides.
                token_id in request.stop_check_ids or num_tokens >= request.max_num_tokens
            ) and (status := self._stop_status(request, token_id)) is not None:
                self._finish(request, status)
                outputs.append(_output(request, [token_id], [] if logprobs is None else [logprobs]))
            elif logprobs is None and token_rows is not None:
                num_prompt = request.num_prompt_tokens
                token_rows[request_id] = (
                    token_id,
                    num_prompt,
                    num_tokens - num_prompt,
                    request.num_cached_tokens or 0,
                )
            else:
                num_prompt = request.num_prompt_tokens
                outputs.append(
                    RequestOutput(
                        request_id,
                        [token_id],
                        [] if logprobs is None else [logprobs],
                        False,
                        None,
                        None,
                        num_prompt,
                        num_tokens - num_prompt,
                        request.num_cached_tokens or 0,
                    )
                )
        return outputs

    def _current(self, plan: StepPlan, request_id: str) -> Request | None:
        """The request a result of ``plan`` is for, unless it was aborted or preempted
        (and perhaps re-admitted) since the plan was made."""
        request = self._requests.get(request_id)
        if (
            request is None
            or request.status is not RequestStatus.RUNNING
            or request.num_preemptions != plan.sampling[request_id]
        ):
            return None
        return request

    # -- state, for the engine loop and tests ------------------------------------

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def get_request(self, request_id: str) -> Request | None:
        """An unfinished request by id (finished ones are not kept)."""
        return self._requests.get(request_id)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_free_blocks(self) -> int:
        return self.kv_cache.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.kv_cache.pool.num_used_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks the prefix cache names, in use or evictable (counted free)."""
        return self.kv_cache.pool.num_cached_blocks

    def check_invariants(self) -> None:
        """Raise AssertionError if queues, block tables and pool disagree."""
        self.kv_cache.pool.check_invariants()
        key = self.policy.key
        _require(self.waiting == sorted(self.waiting, key=key), "waiting out of order")
        _require(self.running == sorted(self.running, key=key), "running out of order")
        _require(len(self.running) <= self.config.max_num_seqs, "too many running")
        queued = Counter(r.request_id for r in [*self.waiting, *self.running])
        _require(queued == Counter(list(self._requests)), "queues and requests disagree")
        for request in [*self.waiting, *self.running]:
            _require(
                request.num_tokens == len(request.all_token_ids),
                f"{request.request_id}'s num_tokens is not its token count",
            )
        self.kv_cache.check_invariants(self.running)
        for request in self.waiting:
            _require(request.status is RequestStatus.WAITING, f"{request} not waiting")
            _require(not request.block_ids, f"waiting {request.request_id} owns blocks")
            _require(request.num_computed_tokens == 0, f"{request.request_id} computed")
        owners = Counter(b for r in self.running for b in r.block_ids)
        for request in self.running:
            _require(request.status is RequestStatus.RUNNING, f"{request} not running")
            _require(
                0 < request.num_computed_tokens <= request.num_tokens + request.num_pending_tokens,
                f"{request.request_id} computed out of range",
            )
            _require(
                0 <= request.num_pending_tokens <= MAX_PENDING_TOKENS,
                f"{request.request_id} pending",
            )
            _require(
                request.num_output_tokens + request.num_pending_tokens <= request.stop.max_tokens
                and request.num_computed_tokens < self.config.max_model_len,
                f"{request.request_id} ran past its length limit",
            )
            num_blocks = self.kv_cache.num_blocks_for(request.num_computed_tokens)
            _require(
                len(request.block_ids) == num_blocks,
                f"{request.request_id} has {len(request.block_ids)} blocks "
                f"for {request.num_computed_tokens} tokens",
            )
            self._check_cached_blocks(request)
        pool = self.kv_cache.pool
        for block_id, num_owners in owners.items():
            _require(num_owners == pool.ref_count(block_id), f"block {block_id} owners")
        _require(len(owners) == pool.num_used_blocks, "a used block has no owner")

    def _check_cached_blocks(self, request: Request) -> None:
        """A block of the table that the cache names holds this request's content:
        it is among the registered ones, under the request's own hash for it."""
        pool = self.kv_cache.pool
        num_registered = request.num_registered_blocks
        _require(
            num_registered <= request.num_computed_tokens // self.config.block_size
            and num_registered <= len(request.block_hashes),
            f"{request.request_id} registered blocks it has not computed",
        )
        for index, block_id in enumerate(request.block_ids):
            block_hash = pool.block_hash(block_id)
            if block_hash is not None:
                _require(
                    index < num_registered and block_hash == request.block_hashes[index],
                    f"{request.request_id}'s block {block_id} is cached with other content",
                )

    # -- inside a step -----------------------------------------------------------

    def _schedule_running(self, plan: StepPlan, budget: int) -> tuple[int, bool]:
        """Decodes and prefill chunks of running requests, smallest key first.

        Returns the budget left and whether any request was preempted. The plan lists a
        running request's blocks only when it gets new ones: the executor keeps the
        table it has (and a new executor gets every table whole: requeue_running).
        Runs once per step over every running request, so the common case (a decode
        whose block has room) is kept to a few attribute reads.
        """
        preempted = False
        running = self.running
        block_size = self.config.block_size
        num_scheduled_tokens = plan.num_scheduled_tokens
        sampling = plan.sampling
        num_computed_after = plan.num_computed_after if self.kv_cache.enable_caching else None
        # A for loop over a list that preemption shortens from its end: the iterator
        # stops at the (new) end, and a request that preempts itself breaks out.
        for request in running:
            if budget <= 0:
                break
            pending = request.num_pending_tokens
            num_known = request.num_tokens + pending
            num_computed = request.num_computed_tokens
            num_new = num_known - num_computed
            if num_new > budget:
                num_new = budget
            if num_new == 0 or (
                pending
                and (
                    pending >= MAX_PENDING_TOKENS
                    # the pending token ends it by length (max_tokens or max_model_len):
                    # nothing follows it
                    or num_known >= request.max_num_tokens
                )
            ):  # its tokens are not back yet, or the pending one ends the request
                continue
            if num_computed + num_new > len(request.block_ids) * block_size:
                while (new_block_ids := self.kv_cache.allocate_slots(request, num_new)) is None:
                    # Requests before this one are scheduled and have smaller keys, so
                    # the largest key left is at the end: a later one, or this one.
                    victim = running.pop()
                    self._preempt(victim)
                    preempted = True
                    if victim is request:
                        break
                if new_block_ids is None:
                    break  # it preempted itself, and it was the last one
                plan.cached_requests.append(CachedRequestData(request.request_id, new_block_ids))
            # As _commit, inline.
            request_id = request.request_id
            num_scheduled_tokens[request_id] = num_new
            request.num_computed_tokens = num_computed = num_computed + num_new
            if (
                num_computed_after is not None
                and num_computed // block_size > request.num_registered_blocks
            ):  # it completes a block not cached yet (a decode: once per block_size steps)
                num_computed_after[request_id] = (request.num_preemptions, num_computed)
            if num_computed == num_known:
                request.num_pending_tokens = pending + 1  # this step samples one
                sampling[request_id] = request.num_preemptions
            budget -= num_new
        return budget, preempted

    def _schedule_waiting(self, plan: StepPlan, budget: int) -> None:
        """Admit waiting requests in key order while budget, seats and blocks last.

        A request starts past its longest cached prefix; only the rest counts against
        the budget.
        """
        kv_cache = self.kv_cache
        in_flight: set[bytes] | None = None  # block hashes steps in flight compute
        order = self._admission_order()  # None: the waiting queue's own order
        admitted: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            if order is None:
                request = self.waiting[0]
            elif order:
                request = order[0]
            else:
                break
            # An embed request pools every position's hidden state: no cached prefix.
            cached_block_ids = [] if request.embed else kv_cache.find_cached_prefix(request)
            if kv_cache.enable_caching and not request.embed:
                if in_flight is None:
                    in_flight = kv_cache.hashes_in_flight()  # of every running request
                if kv_cache.waits_for_block_in_flight(request, len(cached_block_ids), in_flight):
                    break  # the head waits for it to be cached, as it would for blocks
            num_cached = len(cached_block_ids) * self.config.block_size
            num_new = min(request.num_tokens - num_cached, budget)
            if kv_cache.allocate_slots(request, num_new, cached_block_ids) is None:
                victim = self._victim_for(request)
                if victim is None:
                    break  # the head waits, and nothing behind it skips ahead
                budget += self._unschedule(plan, victim)
                self._remove(self.running, victim)
                self._preempt(victim)
                in_flight = None  # the victim's blocks in flight are not coming
                continue
            if order is None:
                del self.waiting[0]
            else:
                del order[0]
                self._remove(self.waiting, request)
            admitted.append(request)
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens is None:  # the first admission
                request.num_cached_tokens = num_cached
            if kv_cache.enable_caching:
                self.num_prefix_cache_queries += request.num_tokens
                self.num_prefix_cache_hits += num_cached
            request.status = RequestStatus.RUNNING
            insort(self.running, request, key=self.policy.key)
            plan.new_requests.append(
                NewRequestData(
                    request_id=request.request_id,
                    all_token_ids=list(request.all_token_ids),
                    num_prompt_tokens=request.num_prompt_tokens,
                    sampling=request.sampling,
                    block_ids=list(request.block_ids),
                    num_computed_tokens=request.num_computed_tokens,
                    embed=request.embed,
                )
            )
            self._commit(plan, request, num_new)
            budget -= num_new
            if in_flight is not None:
                in_flight |= kv_cache.hashes_in_flight([request])
        if order is not None and admitted:
            latest = max(r.arrival_index for r in admitted)
            for request in self.waiting[:LPM_WINDOW]:
                if request.arrival_index < latest:
                    request.num_times_overtaken += 1

    def _admission_order(self) -> list[Request] | None:
        """The order in which the lpm policy tries waiting requests this step: the first
        LPM_WINDOW by priority, then those overtaken LPM_MAX_OVERTAKEN times, then the
        longest cached prefix first, then arrival; the rest as queued. None for the
        other policies: the queue's order."""
        if not (self.policy.prefers_cached_prefix and self.kv_cache.enable_caching):
            return None
        window = self.waiting[:LPM_WINDOW]

        def key(request: Request) -> tuple[int, ...]:
            if request.num_times_overtaken >= LPM_MAX_OVERTAKEN:
                return (request.priority, 0, 0, request.arrival_index)
            num_cached = len(self.kv_cache.find_cached_prefix(request))
            return (request.priority, 1, -num_cached, request.arrival_index)

        return sorted(window, key=key) + self.waiting[LPM_WINDOW:]

    def _commit(self, plan: StepPlan, request: Request, num_new: int) -> None:
        plan.num_scheduled_tokens[request.request_id] = num_new
        request.num_computed_tokens += num_new
        if self.kv_cache.enable_caching:
            plan.num_computed_after[request.request_id] = (
                request.num_preemptions,
                request.num_computed_tokens,
            )
        if request.num_computed_tokens == request.num_tokens + request.num_pending_tokens:
            request.num_pending_tokens += 1  # this step samples one
            plan.sampling[request.request_id] = request.num_preemptions

    def _victim_for(self, request: Request) -> Request | None:
        """The running request to preempt so a waiting one gets blocks, if any.

        Only blocks trigger this: a better-keyed request does not preempt for a seat
        or for token budget, it waits for the next step.
        """
        if not self.policy.preempts_for_waiting or not self.running:
            return None
        worst = self.running[-1]
        if self.policy.key(worst) > self.policy.key(request):
            return worst
        return None

    def _unschedule(self, plan: StepPlan, request: Request) -> int:
        """Take a request out of this step's plan; returns the tokens it gave back."""
        request_id = request.request_id
        # Requests admitted this step have smaller keys than any victim.
        assert all(new.request_id != request_id for new in plan.new_requests)
        plan.cached_requests = [c for c in plan.cached_requests if c.request_id != request_id]
        plan.sampling.pop(request_id, None)  # its pending counts are reset by _preempt
        plan.num_computed_after.pop(request_id, None)
        return plan.num_scheduled_tokens.pop(request_id, 0)

    def _preempt(self, request: Request) -> None:
        """Send a request (already out of running) back to waiting, to recompute."""
        self.kv_cache.free(request)
        request.num_computed_tokens = 0  # its outputs stay: they become prompt-like
        request.num_pending_tokens = 0  # a token in flight is dropped when it comes
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        insort(self.waiting, request, key=self.policy.key)
        self._finished_ids.append(request.request_id)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status is RequestStatus.RUNNING:
            self._remove(self.running, request)
            self._finished_ids.append(request.request_id)
        else:
            self._remove(self.waiting, request)
        self.kv_cache.free(request)
        request.status = status
        del self._requests[request.request_id]

    def _remove(self, queue: list[Request], request: Request) -> None:
        """queue.remove(request), found by bisection on the policy key (unique: every
        key ends with the arrival index) instead of a scan that reads every request
        before it, which under churn meant a cache miss per running request."""
        key = self.policy.key
        index = bisect_left(queue, key(request), key=key)
        if index < len(queue) and queue[index] is request:
            del queue[index]
        else:  # out of order (check_invariants says so): the scan still finds it
            queue.remove(request)

    def _stop_status(self, request: Request, token_id: int) -> RequestStatus | None:
        stop = request.stop
        if request.num_output_tokens >= stop.min_tokens and (
            token_id in stop.stop_token_ids
            or (not stop.ignore_eos and token_id in stop.eos_token_ids)
        ):
            request.stop_token_id = token_id
            return RequestStatus.FINISHED_STOPPED
        if (
            request.num_output_tokens >= stop.max_tokens
            or request.num_tokens >= self.config.max_model_len
        ):
            return RequestStatus.FINISHED_LENGTH
        return None

    # -- checks ------------------------------------------------------------------

    def check_admissible(self, request: Request) -> None:
        """Raise RequestRejected if add_request would refuse this request; adds nothing."""
        request_id = request.request_id
        if request_id in self._requests:
            raise RequestRejected(
                f"request {request_id!r}: an unfinished request has this id already"
            )
        num_prompt = request.num_prompt_tokens
        if num_prompt == 0:
            raise RequestRejected(f"request {request_id!r}: the prompt is empty")
        if request.embed and (request.stop.max_tokens != 1 or request.output_token_ids):
            raise RequestRejected(
                f"request {request_id!r}: an embed request generates nothing (max_tokens "
                "must be 1, with no resumed outputs)"
            )
        max_model_len = self.config.max_model_len
        if num_prompt >= max_model_len:
            raise RequestRejected(
                f"request {request_id!r}: the prompt has {num_prompt} tokens, which "
                f"leaves no room for output within max_model_len={max_model_len}; "
                f"shorten it to at most {max_model_len - 1} tokens"
            )
        max_tokens = request.stop.max_tokens
        num_tokens = min(num_prompt + max_tokens, max_model_len)
        num_blocks = self.kv_cache.num_blocks_for(num_tokens)
        if num_blocks > self.config.num_blocks:
            raise RequestRejected(
                f"request {request_id!r}: {num_prompt} prompt + {max_tokens} output "
                f"tokens need up to {num_tokens} tokens of KV cache, "
                f"{num_blocks} blocks of {self.config.block_size}, but the pool has "
                f"{self.config.num_blocks} blocks; lower max_tokens or shorten the "
                "prompt"
            )

    def _check_result(self, plan: StepPlan, result: StepResult) -> None:
        """Raise RuntimeError if the executor's tokens break the mirror rule: exactly
        the requests the plan samples (plan.sampling) come back with a token, or with
        an embedding for an embed request."""
        if not result.embeddings and result.sampled_token_ids.keys() == plan.sampling.keys():
            return  # the usual case, in one comparison; else find what differs
        for request_id in [*result.sampled_token_ids, *result.embeddings]:
            if request_id not in plan.sampling:
                scheduled = request_id in plan.num_scheduled_tokens
                raise RuntimeError(
                    f"the executor sampled a token for request {request_id!r}, which "
                    f"this plan {'ran without sampling' if scheduled else 'did not schedule'}"
                )
        for request_id in plan.sampling:
            if (request_id in result.sampled_token_ids) == (request_id in result.embeddings):
                raise RuntimeError(
                    f"request {request_id!r}: by the mirror rule a token was due this "
                    "step, and the executor returned none (or a token and an embedding both)"
                )


def _output(
    request: Request, new_token_ids: list[int], new_logprobs: list[TokenLogprobs]
) -> RequestOutput:
    return RequestOutput(
        request_id=request.request_id,
        new_token_ids=new_token_ids,
        new_logprobs=new_logprobs,
        finished=request.is_finished,
        finish_reason=request.finish_reason,
        stop_token_id=request.stop_token_id,
        num_prompt_tokens=request.num_prompt_tokens,
        num_output_tokens=request.num_output_tokens,
        num_cached_tokens=request.num_cached_tokens or 0,
        embedding=request.embedding,
    )


def _require(condition: bool, message: str) -> None:
    # An explicit raise, not assert: the checks must hold under python -O too.
    if not condition:
        raise AssertionError(message)
