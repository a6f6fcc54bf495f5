"""The step plan: what the scheduler tells the executor to run, and what comes back.

These are plain, torch-free dataclasses. A plan carries only what changed since the
previous step (new requests in full, running requests as appended blocks), so its
size does not grow with the number of running requests. The executor keeps a mirror
of every running request (tokens, block table, number of computed tokens) and
appends the tokens it samples itself; the scheduler applies the same rule, so both
sides agree without resending token lists.

Mirror rule, applied by both sides for every scheduled request:
    tokens to run  = all_token_ids[num_computed : num_computed + num_scheduled]
    sample a token iff num_computed + num_scheduled == len(all_token_ids)
    afterwards       num_computed += num_scheduled; a sampled token is appended

Steps are pipelined one deep: the scheduler may plan step N+1 while step N runs, and
then counts the token N will sample as known (pending) when it applies the rule. The
executor runs plans in order, so by the time it lays out N+1 it has N's token: on
the device, not yet on the host (executor.model_runner feeds it from N's sampled ids).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tessera.common.constraints import Constraint

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


@dataclass(slots=True, frozen=True)
class SamplingOptions:
    """Per-request sampling settings, as the executor needs them."""

    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    min_p: float = 0.0  # 0 disables
    repetition_penalty: float = 1.0  # over prompt and output tokens; 1 disables
    presence_penalty: float = 0.0  # over output tokens; 0 disables
    frequency_penalty: float = 0.0  # over output tokens; 0 disables
    seed: int | None = None  # same seed, same tokens, whatever else is in the batch
    logprobs: int | None = None  # None: none; k >= 0: sampled token plus top k
    # Token ids that may not be sampled until min_tokens outputs exist (EOS, stop ids).
    min_tokens: int = 0
    min_tokens_blocked_ids: tuple[int, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Structured output: the output must match this (executor/grammar.py); None: free.
    constraint: Constraint | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalty(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )


@dataclass(slots=True)
class NewRequestData:
    """A request the executor has not seen (or saw before it was preempted)."""

    request_id: str
    all_token_ids: list[int]  # prompt followed by outputs generated so far
    num_prompt_tokens: int
    sampling: SamplingOptions
    block_ids: list[int]
    num_computed_tokens: int = 0  # > 0 only when a prefix is served from the cache
    # Pool the prompt's final hidden states instead of sampling: when the last prompt
    # position runs, the result carries the mean over every position (an embedding),
    # and no token. Such a request starts at num_computed_tokens 0.
    embed: bool = False


@dataclass(slots=True)
class CachedRequestData:
    """A running request the executor already mirrors: blocks appended this step."""

    request_id: str
    new_block_ids: list[int]


@dataclass(slots=True)
class StepPlan:
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    # request_id -> tokens to run this step, in batch order
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    # requests the executor must forget (finished, aborted or preempted) before this step
    finished_request_ids: list[str] = field(default_factory=list)
    # Scheduler-side only, never sent: the requests this step samples a token for (by
    # the mirror rule), each with its preemption count when scheduled, so that a result
    # that comes back after the request was preempted (and perhaps re-admitted) is
    # recognised as stale.
    sampling: dict[str, int] = field(default_factory=dict)
    # Scheduler-side only, never sent: request id -> (its preemption count, its
    # num_computed_tokens once this step has run), for the prefix cache, which
    # registers the full blocks a step computed only once its result is back. A running
    # request is listed only when the step completes a block it has not cached.
    num_computed_after: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


@dataclass(slots=True, frozen=True)
class TokenLogprobs:
    """Logprob of the sampled token and the top-k alternatives at one position."""

    token_id: int
    logprob: float
    rank: int  # 1-based rank of the sampled token in the full distribution
    top: tuple[tuple[int, float], ...]  # (token_id, logprob), best first


@dataclass(slots=True)
class StepResult:
    """Sampled tokens of the requests that reached the end of their known tokens, and
    the pooled vectors of embed requests that did (those sample nothing)."""

    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    embeddings: dict[str, list[float]] = field(default_factory=dict)
