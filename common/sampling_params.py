"""Public sampling parameters (vLLM-compatible names), validated once at the edge. The
scalar fields' ranges and defaults are declared in ``common/sampling_fields.py``."""

from __future__ import annotations

from dataclasses import dataclass, field

from tessera.common.constraints import Constraint
from tessera.common.plan import SamplingOptions
from tessera.common.sampling_fields import ENGINE, MAX_LOGPROBS, check_all

__all__ = ["MAX_LOGPROBS", "SamplingParams"]


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 disables
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to return with each token
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    # Structured output (common/constraints.py): checked by the caller's edge, off its
    # thread (common.constraints.check), since a compile may take up to its time limit.
    constraint: Constraint | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        check_all(self)  # every declared field's range (common/sampling_fields.py)
        checks = [
            (
                self.max_tokens is None or self.max_tokens >= 1,
                f"max_tokens must be >= 1, got {self.max_tokens}",
            ),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})",
            ),
            (
                all(isinstance(s, str) and s for s in self.stop),
                "stop strings must be non-empty strings",
            ),
            (
                all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
                "stop_token_ids must be non-negative integers",
            ),
            (
                self.constraint is None or isinstance(self.constraint, Constraint),
                "constraint must be a tessera.common.constraints.Constraint",
            ),
            # A complete constrained output may only end (its mask allows EOS alone).
            (
                self.constraint is None or not (self.ignore_eos or self.min_tokens),
                "ignore_eos and min_tokens cannot be combined with a constraint "
                "(structured output), which ends the output once it is complete",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def effective_max_tokens(self, num_prompt_tokens: int, max_model_len: int) -> int:
        """max_tokens, or (unset) whatever room the context leaves, at least 1."""
        if self.max_tokens is not None:
            return self.max_tokens
        return max(max_model_len - num_prompt_tokens, 1)

    def to_options(self, eos_token_ids: tuple[int, ...], seed_offset: int = 0) -> SamplingOptions:
        blocked = tuple(
            sorted(set(self.stop_token_ids) | (set() if self.ignore_eos else set(eos_token_ids)))
        )
        engine = {f.name: getattr(self, f.name) for f in ENGINE}
        engine["seed"] = None if self.seed is None else self.seed + seed_offset
        return SamplingOptions(
            **engine,
            min_tokens_blocked_ids=blocked if self.min_tokens else (),
            logit_bias=tuple(sorted((self.logit_bias or {}).items())),
            constraint=self.constraint,
        )
