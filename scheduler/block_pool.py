"""The block pool: every KV cache block, its reference count, and the free list.

A block is in exactly one state:

    free   ref count 0, in the free list exactly once
    owned  ref count > 0 (one per request table holding it), not in the free list

The free list is a FIFO queue: blocks start in id order and freed blocks join at
the back, so allocation is deterministic and tests can name exact block ids.

Prefix caching will add a third state, cached-and-evictable: ref count 0, holding
a content hash, and still in the free queue. Taking a block from the queue then
evicts its hash first, and a cache hit on such a block pulls it out of the queue
and increfs it. The queue order becomes the eviction order (least recently freed
first), so neither the states nor the verbs here need a redesign.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable


class BlockPool:
    __slots__ = ("num_blocks", "_ref_counts", "_free")

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"BlockPool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref_counts[block_id]

    def allocate(self, num_blocks: int) -> list[int] | None:
        """Take num_blocks free blocks (ref count 1 each), or None if too few are free.

        Never allocates part of a request: either all the blocks or none.
        """
        if num_blocks < 0:
            raise ValueError(f"cannot allocate a negative number of blocks: {num_blocks}")
        if num_blocks > len(self._free):
            return None
        block_ids = [self._free.popleft() for _ in range(num_blocks)]
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
        return block_ids

    def incref(self, block_ids: Iterable[int]) -> None:
        """Add one owner to each owned block (a shared prefix, a forked sequence)."""
        block_ids = list(block_ids)
        for block_id in block_ids:
            if self.ref_count(block_id) == 0:
                raise ValueError(f"cannot share block {block_id}: it is free; allocate it first")
        for block_id in block_ids:
            self._ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one owner from each block; a block nobody owns joins the free list.

        Checks every block before changing any, so a bad call leaves the pool as it
        was.
        """
        block_ids = list(block_ids)
        for block_id, times in Counter(block_ids).items():
            if self.ref_count(block_id) < times:
                raise ValueError(
                    f"cannot free block {block_id} {times} time(s): it has "
                    f"{self._ref_counts[block_id]} owner(s) (double free?)"
                )
        for block_id in block_ids:
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free.append(block_id)

    def check_invariants(self) -> None:
        """Raise AssertionError unless every block is exactly free or owned."""
        in_free_list = Counter(self._free)
        for block_id, ref_count in enumerate(self._ref_counts):
            times_free = in_free_list.pop(block_id, 0)
            if ref_count < 0:
                raise AssertionError(f"block {block_id} has ref count {ref_count}")
            if ref_count == 0 and times_free != 1:
                raise AssertionError(
                    f"free block {block_id} is in the free list {times_free} times"
                )
            if ref_count > 0 and times_free != 0:
                raise AssertionError(
                    f"block {block_id} is owned (ref count {ref_count}) and in the free list"
                )
        if in_free_list:
            raise AssertionError(f"unknown block ids in the free list: {in_free_list}")

    def _check_id(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} is out of range [0, {self.num_blocks})")
