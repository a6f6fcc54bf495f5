"""The block pool: every KV cache block, its reference count, and the prefix cache's
index of full blocks by content hash (scheduler.block_hash).

A block is in exactly one state:

    free       ref count 0, no hash; in the free queue exactly once
    cached     ref count 0, a hash; in the evictable queue exactly once (LRU order)
    in use     ref count > 0 (one per block table holding it), in neither queue;
               with a hash once its content is known and registered, else none

    allocate ──► in use ──free──► free     (no hash)
    free ◄──evict── cached ◄──free── in use (with a hash)
                    cached ──hit──► in use

The free queue is FIFO: blocks start in id order and freed blocks join at the back,
so allocation is deterministic and tests can name exact block ids. Allocation takes
free blocks first and evicts cached ones only when the free queue is empty, least
recently freed first (dropping their hashes). A hit takes a cached block back out of
the evictable queue, or shares a block in use, and counts one more owner.

A hash names at most one block: a second block computed with the same content (two
requests prefilled the same prompt in one step) is simply not registered, and goes
back to the free queue when its owners let go.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Iterable


class BlockPool:
    __slots__ = ("num_blocks", "_ref_counts", "_free", "_evictable", "_hashes", "_cached")

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"BlockPool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        # Cached blocks nobody owns, the next one to evict first (an OrderedDict used
        # as an ordered set: O(1) removal from the middle on a hit).
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._hashes: list[bytes | None] = [None] * num_blocks  # block id -> its hash
        self._cached: dict[bytes, int] = {}  # hash -> the block holding that content

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocate() can hand out now: free ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a registered hash, in use or evictable."""
        return len(self._cached)

    @property
    def evictable_block_ids(self) -> list[int]:
        """Cached blocks nobody owns, in the order allocation evicts them."""
        return list(self._evictable)

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> bytes | None:
        self._check_id(block_id)
        return self._hashes[block_id]

    def cached_block(self, block_hash: bytes) -> int | None:
        """The block holding that content, if any (in use or evictable)."""
        return self._cached.get(block_hash)

    def allocate(self, num_blocks: int) -> list[int] | None:
        """Take num_blocks blocks (ref count 1 each), or None if too few are free.

        Free blocks first, then cached ones, least recently freed first, whose hashes
        are dropped (their content is about to be overwritten). Never allocates part
        of a request: either all the blocks or none.
        """
        if num_blocks < 0:
            raise ValueError(f"cannot allocate a negative number of blocks: {num_blocks}")
        free = self._free
        if num_blocks == 1 and (free or self._evictable):  # the usual case: a decode's
            if free:  # next block, from the free queue, or else the evictable one
                block_id = free.popleft()
            else:
                block_id = self._evict()
            self._ref_counts[block_id] = 1
            return [block_id]
        if num_blocks > len(free) + len(self._evictable):
            return None
        num_from_free = min(num_blocks, len(free))
        block_ids = [free.popleft() for _ in range(num_from_free)]
        for _ in range(num_blocks - num_from_free):
            block_ids.append(self._evict())
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
        return block_ids

    def _evict(self) -> int:
        """Take the least recently freed cached block out of the cache (nobody owns it)."""
        block_id, _ = self._evictable.popitem(last=False)
        del self._cached[self._hashes[block_id]]
        self._hashes[block_id] = None
        return block_id

    def incref(self, block_ids: Iterable[int]) -> None:
        """Add one owner to each owned block (a shared prefix, a forked sequence)."""
        block_ids = list(block_ids)
        for block_id in block_ids:
            if self.ref_count(block_id) == 0:
                raise ValueError(f"cannot share block {block_id}: it is free; allocate it first")
        for block_id in block_ids:
            self._ref_counts[block_id] += 1

    def take_cached(self, block_ids: Iterable[int]) -> None:
        """Add one owner to each cached block (a prefix cache hit), taking the ones
        nobody owned out of the evictable queue."""
        block_ids = list(block_ids)
        for block_id in block_ids:
            if self.block_hash(block_id) is None:
                raise ValueError(f"cannot take block {block_id} from the cache: it has no hash")
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._evictable[block_id]
            self._ref_counts[block_id] += 1

    def register(self, block_id: int, block_hash: bytes) -> bool:
        """Name an owned block's (now computed) content; False, changing nothing, if
        another block holds that content already."""
        if not 0 <= block_id < self.num_blocks:
            self._check_id(block_id)  # raises
        if self._ref_counts[block_id] == 0:
            raise ValueError(f"cannot register block {block_id}: nobody owns it")
        if self._hashes[block_id] is not None:
            raise ValueError(f"block {block_id} is registered already")
        if block_hash in self._cached:
            return False
        self._hashes[block_id] = block_hash
        self._cached[block_hash] = block_id
        return True

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one owner from each block of a block table (in table order).

        A block nobody owns any more joins the back of the free queue if it has no
        hash, in the order given; cached ones join the back of the evictable queue in
        reverse order, so that the end of a freed prefix is evicted before its start
        (which more requests share: a system prompt, a conversation's first turns).
        Checks every block before changing any, so a bad call leaves the pool as it was.
        """
        block_ids = list(block_ids)
        ref_counts = self._ref_counts
        if not block_ids:
            return
        # The usual call (a block table: distinct blocks, each owned) is checked
        # without a Python loop; anything else by the loop that says what is wrong.
        if not (
            len(set(block_ids)) == len(block_ids)
            and min(block_ids) >= 0
            and max(block_ids) < self.num_blocks
            and min(map(ref_counts.__getitem__, block_ids)) > 0
        ):
            for block_id, times in Counter(block_ids).items():
                if self.ref_count(block_id) < times:
                    raise ValueError(
                        f"cannot free block {block_id} {times} time(s): it has "
                        f"{ref_counts[block_id]} owner(s) (double free?)"
                    )
        hashes = self._hashes
        now_cached = []
        for block_id in block_ids:
            ref_counts[block_id] -= 1
            if ref_counts[block_id] > 0:
                continue
            if hashes[block_id] is None:
                self._free.append(block_id)
            else:
                now_cached.append(block_id)
        for block_id in reversed(now_cached):
            self._evictable[block_id] = None

    def reset_cache(self) -> int:
        """Forget every hash (the KV memory behind them is gone, or must not be
        reused): cached blocks become free, least recently used first, and blocks in
        use stay with their owners but will not be cached. Returns how many hashes
        were dropped."""
        num_dropped = len(self._cached)
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._cached.clear()
        self._hashes = [None] * self.num_blocks
        return num_dropped

    def check_invariants(self) -> None:
        """Raise AssertionError unless every block is in exactly one state."""
        in_free_list = Counter(self._free)
        for block_id, ref_count in enumerate(self._ref_counts):
            times_free = in_free_list.pop(block_id, 0)
            block_hash = self._hashes[block_id]
            evictable = block_id in self._evictable
            if ref_count < 0:
                raise AssertionError(f"block {block_id} has ref count {ref_count}")
            if ref_count == 0 and block_hash is None and times_free != 1:
                raise AssertionError(
                    f"free block {block_id} is in the free list {times_free} times"
                )
            if ref_count > 0 and times_free != 0:
                raise AssertionError(
                    f"block {block_id} is owned (ref count {ref_count}) and in the free list"
                )
            if block_hash is not None and times_free != 0:
                raise AssertionError(f"cached block {block_id} is in the free list")
            if evictable != (ref_count == 0 and block_hash is not None):
                raise AssertionError(
                    f"block {block_id} (ref count {ref_count}, "
                    f"{'a' if block_hash else 'no'} hash) is "
                    f"{'' if evictable else 'not '}in the evictable queue"
                )
            if block_hash is not None and self._cached.get(block_hash) != block_id:
                raise AssertionError(f"block {block_id}'s hash names another block")
        if in_free_list:
            raise AssertionError(f"unknown block ids in the free list: {in_free_list}")
        unknown = [b for b in self._evictable if not 0 <= b < self.num_blocks]
        if unknown:
            raise AssertionError(f"unknown block ids in the evictable queue: {unknown}")
        if len(self._cached) != sum(h is not None for h in self._hashes):
            raise AssertionError("the cache index names blocks that do not hold its hashes")

    def _check_id(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} is out of range [0, {self.num_blocks})")
