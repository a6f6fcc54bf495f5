"""Which engine replica runs a request: the gateway's routing policies (issue 17).

A gateway links to every engine replica (a scheduler with its executors) and picks one
per request. The choice is made here, without sockets or clocks, so that it is tested
with exact expectations; ``services.engine_pool`` feeds it the replicas' health and load
and acts on its answer.

    cache_aware   the replica most likely to hold the request's prefix in its KV cache:
                  each replica keeps the block hashes of the prompts routed to it (the
                  scheduler's own sha256 chain, scheduler.block_hash, cache_salt folded
                  into the first block), and the request goes where the longest chain of
                  its first blocks was sent before. Unless that replica's load exceeds
                  the least-loaded one's by more than ``load_threshold``: then, and when
                  no replica matches a single block, the least-loaded one. SGLang's
                  router and llm-d's prefix scorer route the same way.
    least_loaded  the replica with the fewest sequences (running and waiting), then the
                  fewest waiting tokens, then the lowest index.
    round_robin   each serving replica in turn.

A replica that is not serving (lost, or without an executor) is never chosen. The load
of a replica is what its last load report said, or the sequences this gateway has open
on it, whichever is larger: the report (once a second) covers the other gateways; the
gateway's own count is current between reports.

The hashes a replica is credited with are an estimate: it may have evicted them, and it
caches the generated tokens too. The table keeps, per replica, as many hashes as its KV
pool has blocks, least recently routed first out, and forgets them all when the replica
is lost or restarted (its cache is gone with it).
"""

from __future__ import annotations

import enum
import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from tessera.scheduler.block_hash import extend_block_hashes

# Full blocks of a prompt hashed for routing, at most: a longer shared prefix changes no
# decision, and the gateway's hashing stays bounded per request.
MAX_ROUTED_BLOCKS = 64
DEFAULT_LOAD_THRESHOLD = 8  # sequences; see RoutingPolicy.CACHE_AWARE


class RoutingPolicy(enum.Enum):
    CACHE_AWARE = "cache_aware"
    LEAST_LOADED = "least_loaded"
    ROUND_ROBIN = "round_robin"

    @classmethod
    def parse(cls, name: str) -> RoutingPolicy:
        try:
            return cls(name)
        except ValueError:
            names = ", ".join(p.value for p in cls)
            raise ValueError(f"routing policy must be one of {names}, got {name!r}") from None


@dataclass(slots=True, frozen=True)
class Load:
    """A replica's load report (engine.proto EngineLoad), the part routing reads."""

    num_running: int = 0
    num_waiting: int = 0
    num_waiting_tokens: int = 0


@dataclass(slots=True)
class ReplicaState:
    serving: bool = False  # answers, with an executor attached
    # Answers, but has no executor now (recovering): requests sent there wait. Chosen
    # only when no replica is serving, as one engine alone would take them.
    reachable: bool = False
    load: Load = field(default_factory=Load)
    num_open: int = 0  # sequences this gateway has open on it
    capacity: int = 1 << 16  # block hashes kept: its KV pool's blocks, once known
    # block hash -> None, least recently routed first
    hashes: OrderedDict[bytes, None] = field(default_factory=OrderedDict)

    @property
    def num_sequences(self) -> int:
        return max(self.load.num_running + self.load.num_waiting, self.num_open)

    def remember(self, block_hashes: Sequence[bytes]) -> None:
        for h in block_hashes:
            self.hashes[h] = None
            self.hashes.move_to_end(h)
        while len(self.hashes) > self.capacity:
            self.hashes.popitem(last=False)

    def matched_blocks(self, block_hashes: Sequence[bytes]) -> int:
        """How many of the first blocks it holds, from the first on (as the scheduler's
        prefix lookup walks them: a block whose parent was evicted is no hit)."""
        n = 0
        while n < len(block_hashes) and block_hashes[n] in self.hashes:
            n += 1
        return n


def prefix_hashes(
    token_ids: Sequence[int], block_size: int, cache_salt: str = "",
    max_blocks: int = MAX_ROUTED_BLOCKS,
) -> list[bytes]:
    """The scheduler's hashes of the first full blocks of a prompt (at most max_blocks)."""
    hashes: list[bytes] = []
    extend_block_hashes(hashes, token_ids[: max_blocks * block_size], block_size, cache_salt)
    return hashes


class Router:
    """Picks a replica by index; the pool keeps ``replicas`` up to date."""

    def __init__(
        self,
        num_replicas: int,
        policy: RoutingPolicy = RoutingPolicy.CACHE_AWARE,
        block_size: int = 16,
        load_threshold: int = DEFAULT_LOAD_THRESHOLD,
    ) -> None:
        if block_size < 1 or load_threshold < 0:
            raise ValueError("block_size must be >= 1 and load_threshold >= 0")
        self.policy = policy
        self.block_size = block_size
        self.load_threshold = load_threshold
        self.replicas = [ReplicaState() for _ in range(num_replicas)]
        self._turns = itertools.count()

    def add_replica(self) -> int:
        self.replicas.append(ReplicaState())
        return len(self.replicas) - 1

    def set_health(self, index: int, serving: bool, reachable: bool | None = None) -> None:
        replica = self.replicas[index]
        if replica.serving and not serving:
            replica.hashes.clear()  # lost or restarting: its cache is gone, or will be
        replica.serving = serving
        replica.reachable = serving if reachable is None else reachable or serving

    def forget_cache(self, index: int) -> None:
        """The replica dropped its prefix cache (restarted, or reset)."""
        self.replicas[index].hashes.clear()

    def choose(
        self, token_ids: Sequence[int], cache_salt: str = "", exclude: Sequence[int] = ()
    ) -> int | None:
        """The replica to run a prompt on, None if no replica is serving; records the
        prompt's prefix against the chosen replica (cache_aware)."""
        candidates = [i for i, r in enumerate(self.replicas) if r.serving and i not in exclude]
        if not candidates:  # none serving: one that waits for its executor, if any
            waiting = [i for i, r in enumerate(self.replicas) if r.reachable and i not in exclude]
            return min(waiting, key=self._load_key) if waiting else None
        if self.policy is RoutingPolicy.ROUND_ROBIN:
            return candidates[next(self._turns) % len(candidates)]
        least = min(candidates, key=self._load_key)
        if self.policy is RoutingPolicy.LEAST_LOADED:
            return least
        hashes = prefix_hashes(token_ids, self.block_size, cache_salt)
        chosen = least
        if hashes:
            matched = {i: self.replicas[i].matched_blocks(hashes) for i in candidates}
            # the longest match; among equal ones the least loaded
            best = min(candidates, key=lambda i: (-matched[i], self._load_key(i)))
            overloaded = (
                self.replicas[best].num_sequences
                > self.replicas[least].num_sequences + self.load_threshold
            )
            if matched[best] and not overloaded:
                chosen = best
            self.replicas[chosen].remember(hashes)
        return chosen

    def _load_key(self, i: int) -> tuple[int, int, int]:
        r = self.replicas[i]
        return (r.num_sequences, r.load.num_waiting_tokens, i)
