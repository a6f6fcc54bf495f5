"""Prefix caching: block hashes, the pool's cached state and LRU eviction, and the
scheduler's hits, with exact block ids, token counts and eviction order."""

from __future__ import annotations

import argparse
import hashlib
import struct
from collections import Counter, deque

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tessera.common.cli_args import add_config_args, config_from_args
from tessera.common.plan import SamplingOptions, StepPlan
from tessera.proto.tessera.v1 import engine_pb2
from tessera.scheduler import (
    BlockPool,
    KVCacheManager,
    Request,
    RequestOutput,
    Scheduler,
    SchedulerConfig,
    StopConditions,
)
from tessera.scheduler.block_hash import ROOT_HASH, extend_block_hashes, hash_block
from tessera.scheduler.config import SchedulerServerConfig
from tessera.scheduler.policy import LPM_MAX_OVERTAKEN
from tessera.serve import ServeConfig, child_commands
from tests.scheduler.mirror_executor import MirrorExecutor
from tests.scheduler.test_scheduler_core import Harness, counting_sampler, make_scheduler

A = list(range(100, 110))  # 10 tokens: two full blocks of 4, and two in a partial one


def req(request_id: str, tokens: list[int], max_tokens: int = 1, **fields) -> Request:
    stop = StopConditions(max_tokens=max_tokens)
    return Request(request_id, list(tokens), SamplingOptions(), stop, **fields)


def admitted(plan: StepPlan) -> dict[str, tuple[int, list[int]]]:
    """request id -> (tokens served from the cache, block table) of each new request."""
    return {n.request_id: (n.num_computed_tokens, n.block_ids) for n in plan.new_requests}


def run_to_end(h: Harness) -> None:
    while h.scheduler.has_unfinished_requests():
        h.step()


# -- block hashes ------------------------------------------------------------------


def test_block_hashes_are_sha256_over_a_fixed_encoding():
    # Pinned: other processes (and later releases) must compute the same keys.
    assert ROOT_HASH == hashlib.sha256(b"tessera prefix cache, block hash v1").digest()
    # The encoding written out by hand: parent, token count, int64 tokens, key count,
    # then each key's kind and value, length-prefixed.
    tokens = struct.pack("<I4q", 4, 1, 2, 3, 4)
    plain = hashlib.sha256(ROOT_HASH + tokens + struct.pack("<I", 0)).digest()
    assert hash_block(ROOT_HASH, [1, 2, 3, 4]) == plain
    keys = struct.pack("<II", 1, 10) + b"cache_salt" + struct.pack("<I", 1) + b"a"
    salted = hashlib.sha256(ROOT_HASH + tokens + keys).digest()
    assert hash_block(ROOT_HASH, [1, 2, 3, 4], (("cache_salt", "a"),)) == salted
    assert hash_block(plain, [5]) == hashlib.sha256(
        plain + struct.pack("<Iq", 1, 5) + struct.pack("<I", 0)
    ).digest()


def test_the_salt_is_in_the_first_block_and_changes_the_whole_chain():
    tokens = list(range(12))
    plain, salt_a, salt_a2, salt_b = [], [], [], []
    extend_block_hashes(plain, tokens, 4)
    extend_block_hashes(salt_a, tokens, 4, "a")
    extend_block_hashes(salt_a2, tokens, 4, "a")
    extend_block_hashes(salt_b, tokens, 4, "b")
    assert len(plain) == len(salt_a) == 3
    assert salt_a == salt_a2
    assert all(len({p, a, b}) == 3 for p, a, b in zip(plain, salt_a, salt_b, strict=True))
    # chained: the second block's hash covers the first (with its salt) as its parent
    assert salt_a[1] == hash_block(salt_a[0], tokens[4:8])
    assert plain[0] == hash_block(ROOT_HASH, tokens[:4])


def test_only_full_blocks_are_hashed_and_each_once():
    hashes: list[bytes] = []
    extend_block_hashes(hashes, [1, 2, 3, 4, 5, 6, 7], 4)
    assert len(hashes) == 1  # 3 tokens of the second block: not hashed
    first = hashes[0]
    extend_block_hashes(hashes, [1, 2, 3, 4, 5, 6, 7, 8], 4)
    assert hashes[0] is first and len(hashes) == 2
    other: list[bytes] = []
    extend_block_hashes(other, [1, 2, 3, 4, 5, 6, 7, 9], 4)  # the second block differs
    assert other[0] == hashes[0] and other[1] != hashes[1]


# -- the pool ----------------------------------------------------------------------


def h(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


def test_free_blocks_go_first_then_cached_ones_least_recently_freed_deepest_first():
    pool = BlockPool(6)
    assert pool.allocate(3) == [0, 1, 2]  # a's table
    assert pool.allocate(2) == [3, 4]  # b's table
    for block_id, name in zip([0, 1, 2, 3, 4], ["a0", "a1", "a2", "b0", "b1"], strict=True):
        assert pool.register(block_id, h(name))
    pool.free([0, 1, 2])  # a ends: its last block is evicted first
    pool.free([3, 4])
    assert pool.evictable_block_ids == [2, 1, 0, 4, 3]
    assert (pool.num_free_blocks, pool.num_used_blocks, pool.num_cached_blocks) == (6, 0, 5)
    assert pool.allocate(3) == [5, 2, 1]  # the free block, then the two oldest cached
    assert (pool.cached_block(h("a2")), pool.cached_block(h("a1"))) == (None, None)
    assert pool.cached_block(h("a0")) == 0
    assert pool.block_hash(2) is None  # evicted: its content is about to change
    pool.take_cached([3])  # a hit: out of the queue, one owner
    assert pool.evictable_block_ids == [0, 4]
    assert pool.ref_count(3) == 1
    pool.free([3])  # back at the end: most recently used
    assert pool.evictable_block_ids == [0, 4, 3]
    assert pool.allocate(4) is None  # 3 evictable: nothing is taken
    assert pool.evictable_block_ids == [0, 4, 3]
    pool.check_invariants()


def test_a_hash_names_one_block_and_a_hit_can_share_a_block_in_use():
    pool = BlockPool(4)
    first, second = pool.allocate(1)[0], pool.allocate(1)[0]
    assert pool.register(first, h("x"))
    assert not pool.register(second, h("x"))  # same content computed twice: one is kept
    assert pool.block_hash(second) is None
    pool.take_cached([first])  # shared while in use
    assert pool.ref_count(first) == 2
    with pytest.raises(ValueError, match="block 1 from the cache: it has no hash"):
        pool.take_cached([second])
    with pytest.raises(ValueError, match="block 0 is registered already"):
        pool.register(first, h("y"))
    with pytest.raises(ValueError, match="cannot register block 3: nobody owns it"):
        pool.register(3, h("z"))
    pool.free([first, second, first])
    assert pool.evictable_block_ids == [first]
    assert list(pool._free) == [2, 3, second]
    pool.check_invariants()


def test_reset_makes_cached_blocks_free_and_forgets_the_hashes_of_blocks_in_use():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    for block_id in blocks:
        pool.register(block_id, h(f"b{block_id}"))
    pool.free(blocks[:2])
    assert pool.reset_cache() == 3
    assert pool.evictable_block_ids == []
    assert list(pool._free) == [3, 1, 0]
    assert pool.cached_block(h("b2")) is None and pool.ref_count(2) == 1
    pool.free([2])
    assert list(pool._free) == [3, 1, 0, 2]  # no hash any more: plain free
    pool.check_invariants()


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda pool: pool._evictable.pop(0), "block 0 .* is not in the evictable queue"),
        (lambda pool: pool._free.append(0), "cached block 0 is in the free list"),
        (lambda pool: pool._cached.pop(h("a")), "block 0's hash names another block"),
        (lambda pool: pool._evictable.__setitem__(9, None), "unknown block ids in the evict"),
        (lambda pool: pool._ref_counts.__setitem__(0, 1), "block 0 .* is in the evictable"),
    ],
)
def test_check_invariants_catches_a_corrupt_cache(corrupt, message):
    pool = BlockPool(3)
    pool.allocate(1)
    pool.register(0, h("a"))
    pool.free([0])
    corrupt(pool)
    with pytest.raises(AssertionError, match=message):
        pool.check_invariants()


def test_an_admission_that_does_not_fit_takes_no_cached_block():
    manager = KVCacheManager(BlockPool(3), block_size=2)
    first = req("a", [1, 2, 3, 4, 5])
    assert manager.allocate_slots(first, 5) == [0, 1, 2]
    first.num_computed_tokens = 5
    manager.register_computed(first, 5)
    manager.free(first)  # blocks 0, 1 cached; 2 free
    second = req("b", [1, 2, 3, 4, 9, 9, 9])
    hits = manager.find_cached_prefix(second)
    assert hits == [0, 1]
    # 7 tokens: 4 blocks, 2 of them new, but only block 2 is free once 0 and 1 are taken
    assert manager.allocate_slots(second, 3, hits) is None
    assert manager.pool.evictable_block_ids == [1, 0] and second.block_ids == []
    third = req("c", [1, 2, 3, 4, 8, 8])
    hits = manager.find_cached_prefix(third)
    assert manager.allocate_slots(third, 2, hits) == [0, 1, 2]
    assert third.num_registered_blocks == 2
    manager.pool.check_invariants()


# -- the scheduler -----------------------------------------------------------------


def cached_harness(**overrides) -> Harness:
    """A scheduler that has run A to its end: A's two full blocks, 0 and 1, are cached
    (block 1 to be evicted first), its partial block 2 is free."""
    h = Harness(make_scheduler(**overrides))
    h.add(req("a", A))
    plan, _ = h.step()
    assert admitted(plan)["a"][0] == 0
    run_to_end(h)  # one step, or two if the budget chunks it
    assert h.scheduler.kv_cache.pool.evictable_block_ids == [1, 0]
    assert list(h.scheduler.kv_cache.pool._free)[-1] == 2
    assert h.scheduler.num_free_blocks == 16 and h.scheduler.num_cached_blocks == 2
    return h


@pytest.mark.parametrize(
    ("tokens", "num_cached", "block_ids"),
    [
        ([1, *A[1:]], 0, [3, 4, 5]),  # the first token differs: no block shared
        (A[:4] + [7] * 5, 4, [0, 3, 4]),  # one full block shared
        (A[:8] + [9] * 3, 8, [0, 1, 3]),  # two
        (A + [9], 8, [0, 1, 3]),  # A's partial block is never shared, nor cached
        (A, 8, [0, 1, 3]),  # the same prompt: all its full blocks
        # Every token in cached full blocks: the last token must run, so the block
        # that holds it is computed again, in a new block (never written shared).
        (A[:8], 4, [0, 3]),
        (A[:4], 0, [3]),
    ],
)
def test_a_hit_is_the_longest_cached_run_of_full_blocks_before_the_last_token(
    tokens, num_cached, block_ids
):
    h = cached_harness()
    h.add(req("b", tokens, max_tokens=2))
    plan, outputs = h.step()
    assert admitted(plan) == {"b": (num_cached, block_ids)}
    assert plan.num_scheduled_tokens == {"b": len(tokens) - num_cached}
    assert h.executor.last_run == {"b": tokens[num_cached:]}
    assert outputs[0].num_cached_tokens == num_cached
    assert h.scheduler.num_prefix_cache_queries == len(A) + len(tokens)
    assert h.scheduler.num_prefix_cache_hits == num_cached
    run_to_end(h)
    assert h.scheduler.num_free_blocks == 16


def test_different_salts_share_nothing_and_the_same_salt_shares():
    h = Harness(make_scheduler())
    h.add(req("a", A, cache_salt="tenant-1"))
    h.step()
    h.add(req("b", A, 2, cache_salt="tenant-2"), req("c", A, 2))  # c: the shared namespace
    plan, _ = h.step()
    assert admitted(plan) == {"b": (0, [3, 4, 5]), "c": (0, [6, 7, 8])}
    b, c = h.scheduler.get_request("b"), h.scheduler.get_request("c")
    a_hashes = [b.block_hashes, c.block_hashes]
    assert all(x != y for x, y in zip(*a_hashes, strict=True))
    h.add(req("d", A, cache_salt="tenant-1"))
    plan, _ = h.step()
    assert admitted(plan) == {"d": (8, [0, 1, 9])}


def test_the_sequences_of_an_n_request_compute_the_prompt_blocks_once():
    h = Harness(make_scheduler())
    h.add(*(req(f"n/{j}", A, max_tokens=3) for j in range(4)))
    plan, _ = h.step()
    # The others wait for n/0's blocks rather than compute them again.
    assert admitted(plan) == {"n/0": (0, [0, 1, 2])}
    assert h.scheduler.num_waiting == 3
    plan, _ = h.step()
    assert admitted(plan) == {"n/1": (8, [0, 1, 3]), "n/2": (8, [0, 1, 4]), "n/3": (8, [0, 1, 5])}
    assert plan.num_scheduled_tokens == {"n/0": 1, "n/1": 2, "n/2": 2, "n/3": 2}
    pool = h.scheduler.kv_cache.pool
    assert [pool.ref_count(b) for b in range(7)] == [4, 4, 1, 1, 1, 1, 0]
    assert h.scheduler.num_used_blocks == 6  # 12 without the cache
    assert (h.scheduler.num_prefix_cache_queries, h.scheduler.num_prefix_cache_hits) == (40, 24)
    run_to_end(h)
    assert h.scheduler.num_free_blocks == 16


def test_without_the_cache_every_sequence_computes_its_prompt():
    h = Harness(make_scheduler(enable_prefix_caching=False))
    h.add(*(req(f"n/{j}", A, max_tokens=3) for j in range(4)))
    plan, outputs = h.step()
    assert [n.num_computed_tokens for n in plan.new_requests] == [0, 0, 0, 0]
    assert h.scheduler.num_used_blocks == 12
    assert [o.num_cached_tokens for o in outputs] == [0, 0, 0, 0]
    run_to_end(h)
    h.add(req("again", A))
    plan, _ = h.step()
    assert admitted(plan)["again"][0] == 0
    assert h.scheduler.num_cached_blocks == 0
    assert (h.scheduler.num_prefix_cache_queries, h.scheduler.num_prefix_cache_hits) == (0, 0)


def test_blocks_are_cached_only_once_the_step_that_computed_them_is_back():
    scheduler = make_scheduler()
    executor = MirrorExecutor(scheduler.config.block_size, counting_sampler)
    scheduler.add_request(req("a", A, max_tokens=4))
    plan_1 = scheduler.schedule()
    result_1 = executor.execute(plan_1)
    assert scheduler.num_cached_blocks == 0  # scheduled, not known computed
    scheduler.add_request(req("b", A))
    plan_2 = scheduler.schedule()  # pipelined: a's prefill is still in flight
    assert list(plan_2.num_scheduled_tokens) == ["a"]  # b waits for a's blocks
    result_2 = executor.execute(plan_2)
    scheduler.update_from_result(plan_1, result_1)
    assert scheduler.num_cached_blocks == 2
    plan_3 = scheduler.schedule()
    assert admitted(plan_3) == {"b": (8, [0, 1, 3])}
    executor.execute(plan_3)
    scheduler.update_from_result(plan_2, result_2)
    scheduler.check_invariants()
    executor.assert_mirrors(scheduler)


def test_a_result_from_before_a_preemption_caches_nothing_of_the_new_table():
    config = dict(num_blocks=4, block_size=2, max_model_len=8, policy="priority")
    scheduler = make_scheduler(**config)
    executor = MirrorExecutor(2, counting_sampler)
    scheduler.add_request(req("a", [10, 11, 12, 13], max_tokens=4, priority=1))
    plan_1 = scheduler.schedule()
    result_1 = executor.execute(plan_1)
    scheduler.add_request(req("b", [20, 21, 22], max_tokens=2, priority=0))
    plan_2 = scheduler.schedule()  # a is preempted for b, and admitted again
    assert admitted(plan_2) == {"b": (0, [3, 0]), "a": (0, [1, 2])}
    result_2 = executor.execute(plan_2)
    scheduler.update_from_result(plan_1, result_1)  # a's old blocks, gone: not cached
    assert scheduler.num_cached_blocks == 0
    assert scheduler.get_request("a").num_registered_blocks == 0
    scheduler.update_from_result(plan_2, result_2)  # b's first block, a's two
    pool = scheduler.kv_cache.pool
    assert [pool.block_hash(b) is not None for b in range(4)] == [False, True, True, True]
    scheduler.check_invariants()
    executor.assert_mirrors(scheduler)


def test_a_step_that_never_comes_back_caches_nothing():
    h = Harness(make_scheduler())
    h.add(req("a", A, max_tokens=4))
    h.scheduler.schedule()  # lost with the executor
    assert h.scheduler.requeue_running() == 1
    h.executor = MirrorExecutor(4, counting_sampler)  # the new one holds no K/V
    h.add(req("b", A))
    plan, _ = h.step()
    # a's blocks were never cached: they went back to the end of the free queue
    assert admitted(plan) == {"a": (0, [3, 4, 5])}  # b waits for a's blocks
    plan, _ = h.step()
    assert admitted(plan) == {"b": (8, [3, 4, 6])}


def test_an_executor_restart_or_a_reset_drops_every_cached_block():
    h = cached_harness()
    h.add(req("b", A[:8] + [5], max_tokens=8))
    h.step()  # b runs on blocks 0 and 1 (hits) and 3
    assert h.scheduler.requeue_running() == 1  # the executor is lost
    assert h.scheduler.num_cached_blocks == 0
    assert h.scheduler.kv_cache.pool.evictable_block_ids == []
    h.executor = MirrorExecutor(4, counting_sampler)
    plan, _ = h.step()
    assert admitted(plan) == {"b": (0, [4, 5, 6])}  # recomputed from its prompt
    run_to_end(h)
    # b's 16 computed tokens of 17 (its last output never ran): 4 full blocks
    assert h.scheduler.num_cached_blocks == 4
    assert h.scheduler.reset_prefix_cache() == 4
    h.add(req("c", A))
    plan, outputs = h.step()
    assert admitted(plan)["c"][0] == 0 and outputs[0].num_cached_tokens == 0
    assert h.scheduler.num_free_blocks == 16


def test_the_token_budget_counts_only_the_tokens_to_compute():
    h = cached_harness(max_num_batched_tokens=6)
    h.add(req("b", A[:8] + [9] * 3), req("z", [50, 51, 52, 53, 54]))
    plan, _ = h.step()
    assert plan.num_scheduled_tokens == {"b": 3, "z": 3}  # b: 11 tokens, 8 cached
    assert admitted(plan) == {"b": (8, [0, 1, 3]), "z": (0, [4])}  # z: 3 tokens, 1 block


def test_the_scheduler_output_reports_cached_tokens_of_the_first_admission():
    h = cached_harness()
    h.add(req("b", A[:8] + [9], max_tokens=2))
    _, outputs = h.step()
    assert outputs == [RequestOutput("b", [109], [], False, None, None, 9, 1, 8)]
    assert h.scheduler.get_request("b").num_cached_tokens == 8


def test_a_preempted_request_is_resumed_past_the_blocks_still_cached():
    # cache-on counterpart of test_scheduler_core's preemption test: b, preempted,
    # comes back on a's freed blocks: the free one (1), then the oldest cached (2);
    # b's own cached block 1 was evicted for a meanwhile.
    h = Harness(make_scheduler(num_blocks=3, block_size=2, max_model_len=6))
    for rid in "abc":
        h.add(req(rid, [10 * (ord(rid) - 96), 10 * (ord(rid) - 96) + 1], max_tokens=5))
    plan, _ = h.step()
    assert [n.block_ids for n in plan.new_requests] == [[0], [1], [2]]
    plan, _ = h.step()
    assert plan.finished_request_ids == ["c", "b"] and plan.new_requests == []
    while "b" not in admitted(plan):
        plan, _ = h.step()
    assert admitted(plan) == {"b": (0, [1, 2])}
    run_to_end(h)
    assert isinstance(h.scheduler, Scheduler) and h.scheduler.num_free_blocks == 3


# -- the lpm policy ----------------------------------------------------------------


@pytest.mark.parametrize(("policy", "order"), [("fcfs", ["x", "b"]), ("lpm", ["b", "x"])])
def test_lpm_admits_the_longest_cached_prefix_first(policy, order):
    h = cached_harness(policy=policy, max_num_seqs=1)
    h.add(req("x", [50] * 10), req("y", A[:4] + [60] * 6), req("b", A[:8] + [9]))
    seen = []
    while h.scheduler.has_unfinished_requests():
        plan, _ = h.step()
        seen += [rid for rid in admitted(plan) if rid != "y"]
    assert seen == order


def test_lpm_prefers_the_cache_only_within_a_priority():
    h = cached_harness(policy="lpm", max_num_seqs=1)
    h.add(req("x", [50] * 10, priority=0), req("b", A[:8] + [9], priority=1))
    plan, _ = h.step()
    assert list(admitted(plan)) == ["x"]


def test_lpm_lets_a_request_be_overtaken_a_bounded_number_of_times():
    h = cached_harness(policy="lpm", max_num_seqs=1)
    starved = req("s", [50] * 10)  # never hits
    h.add(starved)
    for step in range(1, LPM_MAX_OVERTAKEN + 2):
        h.add(req(f"hit{step}", A[:8] + [step]))  # arrives later, hits 8 tokens
        plan, _ = h.step()
        if "s" in admitted(plan):
            break
    assert step == LPM_MAX_OVERTAKEN + 1
    assert starved.num_times_overtaken == LPM_MAX_OVERTAKEN


# -- random use, against a model of both queues, the hashes and the ref counts -------


class PrefixCacheMachine(RuleBasedStateMachine):
    """Requests admitted through the cache, grown, computed (registered), preempted,
    resumed and finished, under pressure that evicts, and resets: every block stays in
    exactly one state, with as many owners as tables hold it, and allocation, hits and
    eviction follow the model exactly."""

    @initialize(num_blocks=st.integers(1, 12), block_size=st.integers(1, 3))
    def setup(self, num_blocks: int, block_size: int) -> None:
        self.manager = KVCacheManager(BlockPool(num_blocks), block_size)
        self.block_size = block_size
        self.free = deque(range(num_blocks))  # the model
        self.evictable: list[int] = []
        self.cached: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.refs = [0] * num_blocks
        self.live: list[Request] = []  # holding blocks
        self.preempted: list[Request] = []
        self.seen: list[tuple[list[int], str]] = []  # tokens and salt of every request
        self.computed: list[tuple[list[int], str]] = []  # ... of those with blocks registered
        self.count = 0

    def _take(self, num_blocks: int) -> list[int]:
        taken = []
        for _ in range(num_blocks):
            if self.free:
                block_id = self.free.popleft()
            else:
                block_id = self.evictable.pop(0)
                del self.cached[self.hash_of.pop(block_id)]
            self.refs[block_id] = 1
            taken.append(block_id)
        return taken

    def _admit(self, request: Request) -> None:
        bs = self.block_size
        hashes: list[bytes] = []
        extend_block_hashes(hashes, request.all_token_ids, bs, request.cache_salt)
        expected_hits = []
        for block_hash in hashes[: (request.num_tokens - 1) // bs]:
            if block_hash not in self.cached:
                break
            expected_hits.append(self.cached[block_hash])
        hits = self.manager.find_cached_prefix(request)
        assert hits == expected_hits
        num_new = request.num_tokens - len(hits) * bs
        needed = -(-request.num_tokens // bs) - len(hits)
        reclaimed = [b for b in hits if self.refs[b] == 0]
        appended = self.manager.allocate_slots(request, num_new, hits)
        if needed > len(self.free) + len(self.evictable) - len(reclaimed):
            assert appended is None and request.block_ids == []
            self.preempted.append(request)  # waits, holding nothing
            return
        for block_id in hits:
            if self.refs[block_id] == 0:
                self.evictable.remove(block_id)
            self.refs[block_id] += 1
        assert appended == [*hits, *self._take(needed)]
        request.num_computed_tokens = request.num_tokens
        assert request.num_registered_blocks == len(hits)
        self.live.append(request)
        self.seen.append((list(request.all_token_ids), request.cache_salt))

    def _release(self, request: Request) -> None:
        now_cached = []
        for block_id in request.block_ids:
            self.refs[block_id] -= 1
            if self.refs[block_id] == 0:
                if block_id in self.hash_of:
                    now_cached.append(block_id)
                else:
                    self.free.append(block_id)
        self.evictable.extend(reversed(now_cached))
        self.manager.free(request)
        self.live.remove(request)

    @rule(
        prompt=st.lists(st.integers(0, 2), min_size=1, max_size=12),
        salt=st.sampled_from(["", "", "s"]),
    )
    def admit(self, prompt: list[int], salt: str) -> None:
        self.count += 1
        self._admit(req(f"r{self.count}", prompt, cache_salt=salt))

    @rule(
        data=st.data(),
        extra=st.lists(st.integers(0, 2), max_size=5),
        computed=st.booleans(),
        same_salt=st.sampled_from([True, True, True, False]),
    )
    def admit_sharing(self, data, extra: list[int], computed: bool, same_salt: bool) -> None:
        """A prompt that starts like an earlier request's tokens (a conversation's next
        turn, n > 1, a shared system prompt), perhaps after its blocks were computed."""
        if not self.seen:
            return
        pick_from = self.computed if self.computed and data.draw(st.booleans()) else self.seen
        tokens, salt = data.draw(st.sampled_from(pick_from))
        cut = data.draw(st.just(len(tokens)) | st.integers(1, len(tokens)))
        prompt = tokens[:cut] + extra
        self.count += 1
        self._admit(req(f"r{self.count}", prompt, cache_salt=salt if same_salt else "t"))
        if computed and self.live and self.live[-1].request_id == f"r{self.count}":
            self._compute(self.live[-1])

    @rule(data=st.data())
    def resume(self, data) -> None:
        if self.preempted:
            request = self.preempted.pop(data.draw(st.integers(0, len(self.preempted) - 1)))
            self._admit(request)

    @rule(data=st.data(), tokens=st.lists(st.integers(0, 2), min_size=1, max_size=6))
    def append(self, data, tokens: list[int]) -> None:
        if not self.live:
            return
        request = data.draw(st.sampled_from(self.live))
        for token in tokens:
            request.append_output(token, None)
        before = list(request.block_ids)
        needed = -(-request.num_tokens // self.block_size) - len(before)
        num_new = request.num_tokens - request.num_computed_tokens  # an earlier append's too
        appended = self.manager.allocate_slots(request, num_new)
        if needed > len(self.free) + len(self.evictable):
            assert appended is None and request.block_ids == before
            return
        assert appended == self._take(max(0, needed))
        request.num_computed_tokens = request.num_tokens

    @rule(data=st.data())
    def compute(self, data) -> None:
        """The step that computed a request's tokens came back: register its blocks."""
        if not self.live:
            return
        self._compute(data.draw(st.sampled_from(self.live)))

    def _compute(self, request: Request) -> None:
        self.computed.append((list(request.all_token_ids), request.cache_salt))
        hashes: list[bytes] = []
        extend_block_hashes(hashes, request.all_token_ids, self.block_size, request.cache_salt)
        first = request.num_registered_blocks
        for index in range(first, request.num_computed_tokens // self.block_size):
            if hashes[index] not in self.cached:  # else: content another block holds
                self.cached[hashes[index]] = request.block_ids[index]
                self.hash_of[request.block_ids[index]] = hashes[index]
        self.manager.register_computed(request, request.num_computed_tokens)

    @rule(data=st.data(), finish=st.booleans())
    def release(self, data, finish: bool) -> None:
        if not self.live:
            return
        request = data.draw(st.sampled_from(self.live))
        self._release(request)
        request.num_computed_tokens = 0
        if not finish:
            self.preempted.append(request)

    @rule(now=st.sampled_from([False, False, False, True]))  # rarely: it empties the cache
    def reset(self, now: bool) -> None:
        if not now:
            return
        assert self.manager.reset_prefix_cache() == len(self.cached)
        self.free.extend(self.evictable)
        self.evictable, self.cached, self.hash_of = [], {}, {}

    @invariant()
    def pool_matches_model(self) -> None:
        if not hasattr(self, "manager"):
            return
        pool = self.manager.pool
        pool.check_invariants()
        assert list(pool._free) == list(self.free)
        assert pool.evictable_block_ids == self.evictable
        assert [pool.ref_count(b) for b in range(pool.num_blocks)] == self.refs
        owners = Counter(b for r in self.live for b in r.block_ids)
        assert [owners[b] for b in range(pool.num_blocks)] == self.refs
        assert {b: pool.block_hash(b) for b in self.hash_of} == self.hash_of
        assert pool.num_cached_blocks == len(self.cached)

    def teardown(self) -> None:
        if not hasattr(self, "manager"):
            return
        for request in list(self.live):
            self._release(request)
        pool = self.manager.pool
        pool.check_invariants()
        assert pool.num_free_blocks == pool.num_blocks
        assert pool.num_cached_blocks == len(pool.evictable_block_ids) == len(self.cached)


PrefixCacheMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None
)
test_prefix_cache_machine = PrefixCacheMachine.TestCase


def test_the_flag_reaches_the_scheduler_process_and_its_config():
    parser = argparse.ArgumentParser()
    add_config_args(parser, SchedulerServerConfig)
    info = engine_pb2.EngineInfo(num_kv_blocks=8, block_size=4, max_model_len=32)
    for argv, enabled in (([], True), (["--no-enable-prefix-caching"], False)):
        config = config_from_args(SchedulerServerConfig, parser.parse_args(argv), environ={})
        assert config.scheduler_config(info).enable_prefix_caching is enabled
        assert Scheduler(config.scheduler_config(info)).kv_cache.enable_caching is enabled
    launched = dict(child_commands(ServeConfig(enable_prefix_caching=False), "/run"))
    assert "--no-enable-prefix-caching" in launched["scheduler"]
    assert (
        "--no-enable-prefix-caching" not in dict(child_commands(ServeConfig(), "/run"))["scheduler"]
    )
    with pytest.raises(ValueError, match="enable_prefix_caching must be a bool"):
        SchedulerConfig(num_blocks=4, enable_prefix_caching=1)
