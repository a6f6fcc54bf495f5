"""Block tables: which pool blocks hold each request's KV, grown on demand, and the
prefix cache that lets requests with the same leading tokens share full blocks.

A request's table covers its tokens in order, block_size tokens per block:

    tokens   [0 ........ 15][16 ....... 31][32 .. 37]
    blocks   [ block_ids[0] ][ block_ids[1] ][ block_ids[2] ]   (block_size 16)

so a table of b blocks holds b * block_size tokens, and the last block fills up
before the next one is taken.

The prefix cache (with enable_caching):

- A full block is named by the hash of its tokens chained to every block before it
  (scheduler.block_hash; the cache_salt goes into the first). A partial block is
  never cached nor shared.
- A block is registered under its hash only once its K/V is known to be in the pool:
  after the step that computed it came back (Scheduler.update_from_result calls
  register_computed). Not when it is scheduled: a step may fail or be lost with its
  executor, and with async scheduling the next step is planned before the last one
  is back. A hit thus never points at K/V that is not there yet.
- At admission a request takes the longest run of cached blocks that matches its
  tokens (prompt, plus the outputs of a preempted request), but at most the full
  blocks before its last token: that token always runs, since the step must produce
  its logits. When every full block is cached, the block holding the last token is
  computed again rather than shared, so a request only ever writes to blocks it owns
  alone.
- A request never writes to a registered block: registered blocks are full, and a
  request writes only past its num_computed_tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tessera.scheduler.block_hash import extend_block_hashes
from tessera.scheduler.block_pool import BlockPool
from tessera.scheduler.request import Request


class KVCacheManager:
    __slots__ = ("pool", "block_size", "enable_caching", "_hashed_ahead")

    def __init__(self, pool: BlockPool, block_size: int, enable_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.pool = pool
        self.block_size = block_size
        self.enable_caching = enable_caching
        # Requests with a block table whose hashes run ahead of their registered blocks
        # (a prompt hashed at admission, not yet computed): the only ones in which
        # hashes_in_flight() can find anything, so it need not read every running one.
        self._hashed_ahead: dict[Request, None] = {}

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)  # ceiling division

    def find_cached_prefix(self, request: Request) -> list[int]:
        """The cached blocks holding the request's longest cached prefix, at most the
        full blocks before its last token. Takes nothing: allocate_slots does."""
        if not self.enable_caching:
            return []
        self._hash_full_blocks(request)
        num_usable = (request.num_tokens - 1) // self.block_size
        block_ids = []
        for block_hash in request.block_hashes[:num_usable]:
            block_id = self.pool.cached_block(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def allocate_slots(
        self, request: Request, num_new_tokens: int, cached_block_ids: Sequence[int] = ()
    ) -> list[int] | None:
        """Grow the table to hold num_computed_tokens + num_new_tokens tokens, after
        the cached blocks (a prefix hit, from find_cached_prefix, for a request with an
        empty table) if any, which count block_size computed tokens each.

        Returns the blocks appended (possibly none; the cached ones first), or None,
        leaving the table and the pool as they were, when the pool has too few blocks.
        """
        if not cached_block_ids:  # the usual case (a decode's next block): no hit to take
            num_missing = (
                -(-(request.num_computed_tokens + num_new_tokens) // self.block_size)
                - len(request.block_ids)
            )
            if num_missing <= 0:
                return []
            new_block_ids = self.pool.allocate(num_missing)
            if new_block_ids is not None:
                request.block_ids.extend(new_block_ids)
                self._note_hashed_ahead(request)
            return new_block_ids
        num_tokens = (
            request.num_computed_tokens + len(cached_block_ids) * self.block_size + num_new_tokens
        )
        num_owned = len(request.block_ids) + len(cached_block_ids)
        num_missing = max(0, self.num_blocks_for(num_tokens) - num_owned)
        # Cached blocks nobody owns leave the evictable queue: they no longer count free.
        num_reclaimed = sum(self.pool.ref_count(b) == 0 for b in cached_block_ids)
        if num_missing > self.pool.num_free_blocks - num_reclaimed:
            return None
        self.pool.take_cached(cached_block_ids)
        new_block_ids = self.pool.allocate(num_missing)
        assert new_block_ids is not None  # counted above
        if cached_block_ids:
            assert not request.block_ids, "a prefix hit is only for an empty table"
            request.num_registered_blocks = len(cached_block_ids)
        appended = [*cached_block_ids, *new_block_ids]
        request.block_ids.extend(appended)
        self._note_hashed_ahead(request)
        return appended

    def register_computed(self, request: Request, num_computed_tokens: int) -> None:
        """The request's first num_computed_tokens tokens are in the pool (a step that
        computed them came back): register its full blocks among them in the cache."""
        if not self.enable_caching:
            return
        num_full = min(num_computed_tokens, request.num_tokens) // self.block_size
        start = request.num_registered_blocks
        if num_full <= start:
            return
        self._hash_full_blocks(request)
        register = self.pool.register
        block_hashes = request.block_hashes
        for index, block_id in enumerate(request.block_ids[start:num_full], start):
            # False for content another block holds already: this one stays uncached.
            register(block_id, block_hashes[index])
        request.num_registered_blocks = num_full
        if len(block_hashes) > num_full:
            self._hashed_ahead[request] = None
        else:
            self._hashed_ahead.pop(request, None)

    def hashes_in_flight(self, requests: Iterable[Request] | None = None) -> set[bytes]:
        """Hashes of the full blocks these (running) requests compute in steps not
        back yet: scheduled, not registered. None: every request with a block table
        (every running one), read through the few whose hashes run ahead."""
        found: set[bytes] = set()
        block_size = self.block_size
        if requests is None:
            requests = list(self._hashed_ahead)
        for request in requests:  # each step that admits: kept lean
            start = request.num_registered_blocks
            end = request.num_computed_tokens // block_size
            if end > start:  # (a slice stops at the hashes there are)
                found.update(request.block_hashes[start:end])
        return found

    def waits_for_block_in_flight(
        self, request: Request, num_cached_blocks: int, in_flight: set[bytes]
    ) -> bool:
        """Whether the first block the (waiting) request would have to compute, past
        its cached prefix, is one that a step in flight computes: it is then cheaper
        to wait for it to be cached (sequences of an n > 1 request, prompts with one
        system prompt arriving together) than to compute it twice."""
        num_usable = (request.num_tokens - 1) // self.block_size
        return (
            num_cached_blocks < min(num_usable, len(request.block_hashes))
            and request.block_hashes[num_cached_blocks] in in_flight
        )

    def free(self, request: Request) -> None:
        """Give back every block of the request now; its table becomes empty. Cached
        blocks stay cached, evictable, the end of the table first."""
        self.pool.free(request.block_ids)
        # A new list, not clear(): a plan sent earlier may still hold the old one.
        request.block_ids = []
        request.num_registered_blocks = 0
        self._hashed_ahead.pop(request, None)

    def check_invariants(self, running: Sequence[Request]) -> None:
        """Raise AssertionError unless the requests kept track of for hashes_in_flight()
        are running ones, and include every running one with a hash in flight."""
        for request in self._hashed_ahead:
            if not any(r is request for r in running):
                raise AssertionError(f"{request.request_id} is kept track of, not running")
        for request in running:
            if self.hashes_in_flight([request]) and request not in self._hashed_ahead:
                raise AssertionError(
                    f"{request.request_id} has hashes in flight and is not kept track of"
                )

    def _note_hashed_ahead(self, request: Request) -> None:
        """Keep track of a request that now holds blocks, if its hashes run ahead of
        its registered blocks (hashes grow only at admission, which precedes this, and
        in register_computed, which keeps track itself)."""
        if len(request.block_hashes) > request.num_registered_blocks:
            self._hashed_ahead[request] = None

    def reset_prefix_cache(self) -> int:
        """Drop every cached hash; returns how many were dropped."""
        return self.pool.reset_cache()

    def _hash_full_blocks(self, request: Request) -> None:
        all_token_ids = request.all_token_ids
        if len(request.block_hashes) < len(all_token_ids) // self.block_size:
            extend_block_hashes(
                request.block_hashes, all_token_ids, self.block_size, request.cache_salt
            )
