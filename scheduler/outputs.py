"""What the scheduler publishes per request and step, for the gateways to stream."""

from __future__ import annotations

from dataclasses import dataclass

from tessera.common.plan import TokenLogprobs
from tessera.common.wire import TokenRow

__all__ = ["RequestOutput", "TokenRow"]


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    new_token_ids: list[int]  # tokens generated this step (empty for an abort)
    new_logprobs: list[TokenLogprobs]  # one per new token, or empty if not asked
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort", or None
    stop_token_id: int | None  # the token that triggered "stop"
    num_prompt_tokens: int
    num_output_tokens: int  # all outputs so far, this step's included
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first admission)
    embedding: list[float] | None = None  # an embed request's vector, on its last output
