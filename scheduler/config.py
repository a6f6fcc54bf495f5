"""Scheduler configuration: one frozen dataclass, validated once when it is built."""

from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("fcfs", "priority")


@dataclass(slots=True, frozen=True)
class SchedulerConfig:
    num_blocks: int  # KV cache blocks in the pool, as the executor sized it
    block_size: int = 16  # tokens per block
    max_num_seqs: int = 256  # requests running at once
    max_num_batched_tokens: int = 2048  # tokens run in one step, over all requests
    max_model_len: int = 2048  # prompt plus output tokens of one request
    policy: str = "fcfs"  # "fcfs" or "priority"

    def __post_init__(self) -> None:
        for name in (
            "num_blocks",
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_model_len",
        ):
            value = getattr(self, name)
            # bool is an int subclass; True blocks would be a typo, not a size
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SchedulerConfig.{name} must be a positive int, got {value!r}")
        if self.policy not in POLICIES:
            raise ValueError(
                f"SchedulerConfig.policy must be one of {POLICIES}, got {self.policy!r}"
            )
