"""Results of the offline API, shaped like vLLM's so existing code ports unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field

from tessera.common.plan import TokenLogprobs


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    logprobs: list[TokenLogprobs] | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    # Prompt tokens served from the prefix cache instead of computed, when the first
    # sequence (index 0) was admitted; with n > 1 the other sequences usually share
    # the blocks it computed.
    num_cached_tokens: int | None = None
