"""BlockPool and KVCacheManager: exact block ids, and invariants under random use."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from tessera.common.plan import SamplingOptions
from tessera.scheduler import BlockPool, KVCacheManager, Request, StopConditions


def make_request(request_id: str = "r") -> Request:
    return Request(request_id, [1, 2, 3], SamplingOptions(), StopConditions(max_tokens=8))


# -- BlockPool -------------------------------------------------------------------


def test_allocates_lowest_ids_first_and_reuses_freed_blocks_last():
    pool = BlockPool(6)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(3) == [2, 3, 4]
    pool.free([1, 0])
    assert pool.num_free_blocks == 3
    assert pool.allocate(3) == [5, 1, 0]  # FIFO: the freed blocks queue behind 5
    assert pool.num_free_blocks == 0
    pool.check_invariants()


def test_allocate_is_all_or_nothing():
    pool = BlockPool(4)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) is None
    assert pool.num_free_blocks == 1  # nothing was taken by the failed call
    assert pool.allocate(0) == []
    assert pool.allocate(1) == [3]


def test_shared_block_returns_to_free_list_only_after_last_owner_frees_it():
    pool = BlockPool(3)
    blocks = pool.allocate(2)
    pool.incref(blocks)
    assert [pool.ref_count(b) for b in range(3)] == [2, 2, 0]
    pool.free(blocks)
    assert pool.num_used_blocks == 2
    pool.free([1])
    assert pool.num_used_blocks == 1
    assert pool.allocate(2) == [2, 1]
    pool.check_invariants()


def test_bad_free_and_incref_raise_and_change_nothing():
    pool = BlockPool(4)
    pool.allocate(2)
    with pytest.raises(ValueError, match="cannot free block 0 2 time"):
        pool.free([1, 0, 0])
    assert [pool.ref_count(b) for b in range(4)] == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="cannot share block 3: it is free"):
        pool.incref([0, 3])
    assert pool.ref_count(0) == 1
    with pytest.raises(ValueError, match=r"block id 9 is out of range \[0, 4\)"):
        pool.free([9])
    # Distinct blocks (a table), one of them bad: the same messages.
    with pytest.raises(ValueError, match="cannot free block 2 1 time"):
        pool.free([0, 2])
    with pytest.raises(ValueError, match=r"block id -1 is out of range \[0, 4\)"):
        pool.free([1, -1])
    assert [pool.ref_count(b) for b in range(4)] == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="negative"):
        pool.allocate(-1)
    pool.check_invariants()


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda pool: pool._free.append(0), "free block 0 is in the free list 2 times"),
        (lambda pool: pool._free.remove(1), "free block 1 is in the free list 0 times"),
        (lambda pool: pool._ref_counts.__setitem__(2, 1), "block 2 is owned"),
        (lambda pool: pool._free.append(7), "unknown block ids"),
    ],
)
def test_check_invariants_catches_a_corrupt_pool(corrupt, message):
    pool = BlockPool(3)
    corrupt(pool)
    with pytest.raises(AssertionError, match=message):
        pool.check_invariants()


# -- KVCacheManager --------------------------------------------------------------


def test_allocate_slots_grows_the_table_one_block_per_block_size_tokens():
    manager = KVCacheManager(BlockPool(4), block_size=4)
    request = make_request()
    assert manager.allocate_slots(request, 5) == [0, 1]
    request.num_computed_tokens = 5
    assert manager.allocate_slots(request, 3) == []  # tokens 5..7 fit in block 1
    request.num_computed_tokens = 8
    assert manager.allocate_slots(request, 1) == [2]
    assert request.block_ids == [0, 1, 2]
    request.num_computed_tokens = 9
    assert manager.allocate_slots(request, 8) is None  # needs 2 more, 1 is free
    assert request.block_ids == [0, 1, 2]
    manager.free(request)
    assert request.block_ids == []
    assert manager.pool.num_free_blocks == 4
    assert manager.num_blocks_for(0) == 0
    assert manager.num_blocks_for(16) == 4
    assert manager.num_blocks_for(17) == 5


# -- random use, against a model of the FIFO free list and the ref counts ---------


class KVCacheMachine(RuleBasedStateMachine):
    """Sequences that grow, fork (sharing blocks), get preempted and get freed."""

    sequences = Bundle("sequences")

    @initialize(num_blocks=st.integers(1, 24), block_size=st.integers(1, 5))
    def setup(self, num_blocks: int, block_size: int) -> None:
        self.manager = KVCacheManager(BlockPool(num_blocks), block_size)
        self.model_free = deque(range(num_blocks))
        self.model_refs = [0] * num_blocks
        self.live: list[Request] = []
        self.count = 0

    def _grow(self, request: Request, num_tokens: int) -> None:
        needed = self.manager.num_blocks_for(request.num_computed_tokens + num_tokens)
        missing = max(0, needed - len(request.block_ids))
        before = list(request.block_ids)
        new = self.manager.allocate_slots(request, num_tokens)
        if missing > len(self.model_free):
            assert new is None
            assert request.block_ids == before
            return
        expected = [self.model_free.popleft() for _ in range(missing)]
        assert new == expected
        assert request.block_ids == before + expected
        for block_id in expected:
            self.model_refs[block_id] = 1
        request.num_computed_tokens += num_tokens

    def _release(self, request: Request) -> None:
        for block_id in request.block_ids:
            self.model_refs[block_id] -= 1
            if self.model_refs[block_id] == 0:
                self.model_free.append(block_id)
        self.manager.free(request)
        assert request.block_ids == []

    @rule(target=sequences, num_tokens=st.integers(1, 40))
    def start(self, num_tokens: int) -> Request:
        self.count += 1
        request = make_request(f"r{self.count}")
        self._grow(request, num_tokens)
        self.live.append(request)
        return request

    @rule(request=sequences, num_tokens=st.integers(1, 20))
    def append(self, request: Request, num_tokens: int) -> None:
        self._grow(request, num_tokens)

    @rule(request=sequences)
    def preempt(self, request: Request) -> None:
        self._release(request)
        request.num_computed_tokens = 0  # may grow again later, from scratch

    @rule(target=sequences, parent=sequences)
    def fork(self, parent: Request) -> Request:
        # Ownership only: copy-on-write of a shared partial block is not modelled.
        self.count += 1
        child = make_request(f"r{self.count}")
        self.manager.pool.incref(parent.block_ids)
        for block_id in parent.block_ids:
            self.model_refs[block_id] += 1
        child.block_ids = list(parent.block_ids)
        child.num_computed_tokens = parent.num_computed_tokens
        self.live.append(child)
        return child

    @rule(request=consumes(sequences))
    def finish(self, request: Request) -> None:
        self._release(request)
        self.live.remove(request)

    @invariant()
    def pool_matches_model(self) -> None:
        pool = self.manager.pool
        pool.check_invariants()
        assert list(pool._free) == list(self.model_free)
        assert [pool.ref_count(b) for b in range(pool.num_blocks)] == self.model_refs
        assert pool.num_free_blocks + pool.num_used_blocks == pool.num_blocks

    def teardown(self) -> None:
        if not hasattr(self, "manager"):
            return
        for request in self.live:
            self._release(request)
        pool = self.manager.pool
        pool.check_invariants()
        assert pool.num_free_blocks == pool.num_blocks


KVCacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_kv_cache_machine = KVCacheMachine.TestCase
