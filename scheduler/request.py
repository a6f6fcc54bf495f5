"""A request as the scheduler tracks it: tokens, progress, blocks, status, stops.

``cache_salt`` isolates tenants in the prefix cache: a request may reuse cached KV
blocks only of requests with the same salt (empty: the shared namespace). The prefix
cache, when it comes, must fold the salt into the hash of a request's first block (so
into every block hash chained from it), never key blocks by tokens alone; otherwise
one tenant could tell from its time to first token which prompts another one sent.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tessera.executor.plan import SamplingOptions, TokenLogprobs

MAX_CACHE_SALT_BYTES = 256


def check_cache_salt(salt: str) -> str:
    """The salt, or ValueError if it is too long to be a key's part."""
    size = len(salt.encode())
    if size > MAX_CACHE_SALT_BYTES:
        raise ValueError(
            f"cache_salt must be at most {MAX_CACHE_SALT_BYTES} bytes (UTF-8), got {size}"
        )
    return salt


@dataclass(slots=True, frozen=True)
class StopConditions:
    """When a request finishes. The scheduler checks these after every token."""

    max_tokens: int  # output tokens at most
    min_tokens: int = 0  # EOS and stop ids do not stop a request before this many
    stop_token_ids: tuple[int, ...] = ()  # stop even when ignore_eos is set
    eos_token_ids: tuple[int, ...] = ()  # the model's end-of-sequence ids
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )


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


@dataclass(slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingOptions
    stop: StopConditions
    priority: int = 0  # lower runs first under the priority policy
    cache_salt: str = ""  # the prefix cache's namespace: see the module docstring
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
    # prompt + outputs, kept alongside so reading it costs no copy per step
    _all_token_ids: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._all_token_ids = [*self.prompt_token_ids, *self.output_token_ids]

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by outputs. Read only: append through append_output."""
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

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
        self._all_token_ids.append(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)
