"""Block tables: which pool blocks hold each request's KV, grown on demand.

A request's table covers its tokens in order, block_size tokens per block:

    tokens   [0 ........ 15][16 ....... 31][32 .. 37]
    blocks   [ block_ids[0] ][ block_ids[1] ][ block_ids[2] ]   (block_size 16)

so a table of b blocks holds b * block_size tokens, and the last block fills up
before the next one is taken.
"""

from __future__ import annotations

from tessera.scheduler.block_pool import BlockPool
from tessera.scheduler.request import Request


class KVCacheManager:
    __slots__ = ("pool", "block_size")

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.pool = pool
        self.block_size = block_size

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)  # ceiling division

    def allocate_slots(self, request: Request, num_new_tokens: int) -> list[int] | None:
        """Grow the table to hold num_computed_tokens + num_new_tokens tokens.

        Returns the blocks appended (possibly none), or None, leaving the table as it
        was, when the pool has too few free blocks.
        """
        num_tokens = request.num_computed_tokens + num_new_tokens
        num_missing = self.num_blocks_for(num_tokens) - len(request.block_ids)
        if num_missing <= 0:
            return []
        new_block_ids = self.pool.allocate(num_missing)
        if new_block_ids is None:
            return None
        request.block_ids.extend(new_block_ids)
        return new_block_ids

    def free(self, request: Request) -> None:
        """Give back every block of the request now; its table becomes empty."""
        self.pool.free(request.block_ids)
        # A new list, not clear(): a plan sent earlier may still hold the old one.
        request.block_ids = []
