"""A request as the scheduler tracks it: tokens, progress, blocks, status, stops.

``cache_salt`` isolates tenants in the prefix cache: a request may reuse cached KV
blocks only of requests with the same salt (empty: the shared namespace). The prefix
cache folds the salt into the hash of a request's first block (so into every block
hash chained from it: scheduler.block_hash), never keys blocks by tokens alone;
otherwise one tenant could tell from its time to first token which prompts another
one sent.

An ``embed`` request generates nothing: its prompt's prefill is scheduled like any
other (chunked, in the same batches as the generating requests), and the step that
runs its last prompt position returns the pooled hidden state instead of a token; it
finishes then ("stop"). Its stop conditions are max_tokens 1, so that the token slot
that step would sample counts as the last one and nothing is scheduled after it.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field

from tessera.common.plan import SamplingOptions, StopConditions, TokenLogprobs


class RequestStatus(enum.Enum):
    WAITING = enum.auto()  # not yet admitted, or preempted and waiting to resume
    RUNNING = enum.auto()
    FINISHED_STOPPED = enum.auto()  # an EOS or stop token
    FINISHED_LENGTH = enum.auto()  # max_tokens or max_model_len
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


# eq=False: a request is equal only to itself, so that finding one in a queue (remove,
# in) compares identities, not every field of every request before it.
@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingOptions
    stop: StopConditions
    priority: int = 0  # lower runs first under the priority policy
    cache_salt: str = ""  # the prefix cache's namespace: see the module docstring
    embed: bool = False  # pool the prompt's hidden states: see the module docstring
    arrival_index: int = 0  # set by Scheduler.add_request; orders equal priorities
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    # Tokens whose K/V is in the cache (or scheduled to be, in the steps in flight).
    num_computed_tokens: int = 0
    # Tokens that steps in flight will sample, not back yet (one per step in flight,
    # scheduler.MAX_PENDING_TOKENS at most). A scheduled range may end on such a token:
    # the executor has it by then. In num_computed_tokens once run, never in num_tokens.
    num_pending_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)  # the block table
    status: RequestStatus = RequestStatus.WAITING
    stop_token_id: int | None = None  # the token that finished it with "stop"
    num_preemptions: int = 0
    # The prefix cache (kv_cache_manager): hashes of the full blocks of all_token_ids
    # hashed so far (kept across preemptions: the tokens only grow), and how many of
    # the table's first blocks the cache knows (hits, and blocks registered once the
    # step that computed them came back). Prompt tokens served from the cache at the
    # first admission: None until then.
    block_hashes: list[bytes] = field(default_factory=list, repr=False)
    num_registered_blocks: int = 0
    num_cached_tokens: int | None = None
    # Steps in which requests that arrived later were admitted while this one waited
    # (the lpm policy's starvation bound).
    num_times_overtaken: int = 0
    # An embed request's pooled vector, once the step of its last prompt position is back.
    embedding: list[float] | None = field(default=None, repr=False)
    # Prompt followed by outputs, kept alongside so reading it costs no copy per step.
    # Read only: append through append_output. A plain attribute, not a property: the
    # scheduler reads it for every running request in every step. Its length too,
    # kept as a field: the per-step loops read it from the request they hold, without
    # fetching the list.
    all_token_ids: list[int] = field(init=False, repr=False)
    num_tokens: int = field(init=False, repr=False)
    # Derived from prompt and stop once (they never change), for the per-step loops:
    # the prompt's length, the token count at which the request ends by length (prompt
    # plus max_tokens outputs; Scheduler.add_request lowers it to max_model_len), and
    # every token id that may stop it (stop ids and EOS ids, whatever min_tokens and
    # ignore_eos say: Scheduler._stop_status decides).
    num_prompt_tokens: int = field(init=False, repr=False)
    max_num_tokens: int = field(init=False, repr=False)
    stop_check_ids: frozenset[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.all_token_ids = [*self.prompt_token_ids, *self.output_token_ids]
        self.num_tokens = len(self.all_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.max_num_tokens = self.num_prompt_tokens + self.stop.max_tokens
        stop = self.stop  # (tuple() of a tuple is that tuple: a key for the cache, free)
        self.stop_check_ids = _stop_check_ids(tuple(stop.stop_token_ids), tuple(stop.eos_token_ids))

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        """One of "stop", "length", "abort"; None while unfinished."""
        return self.status.finish_reason

    def append_output(self, token_id: int, logprobs: TokenLogprobs | None) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        self.num_tokens += 1
        if logprobs is not None:
            self.output_logprobs.append(logprobs)


@functools.lru_cache(maxsize=256)
def _stop_check_ids(
    stop_token_ids: tuple[int, ...], eos_token_ids: tuple[int, ...]
) -> frozenset[int]:
    """One shared set per stop setting: the per-step loop tests every sampled token
    against its request's set, and a set that many requests share stays in cache."""
    return frozenset((*stop_token_ids, *eos_token_ids))
