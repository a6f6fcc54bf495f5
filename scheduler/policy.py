"""Scheduling policies: the order in which requests run and are preempted.

A policy maps a request to a sort key. The smallest key is admitted first and
scheduled first; the largest is preempted first. A new policy is a new class here,
not a branch in Scheduler.schedule().
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

from tessera.scheduler.request import Request


class SchedulingPolicy(Protocol):
    # Whether a waiting request that cannot get blocks may preempt running requests
    # with a larger key. Under FCFS the keys only reflect arrival, and taking blocks
    # from an earlier-admitted request would only churn work.
    preempts_for_waiting: ClassVar[bool]

    def key(self, request: Request) -> tuple[int, ...]: ...


@dataclass(slots=True, frozen=True)
class FCFSPolicy:
    preempts_for_waiting: ClassVar[bool] = False

    def key(self, request: Request) -> tuple[int, ...]:
        return (request.arrival_index,)


@dataclass(slots=True, frozen=True)
class PriorityPolicy:
    """Lower priority numbers first; first come, first served within a priority."""

    preempts_for_waiting: ClassVar[bool] = True

    def key(self, request: Request) -> tuple[int, ...]:
        return (request.priority, request.arrival_index)


def make_policy(name: str) -> SchedulingPolicy:
    if name == "fcfs":
        return FCFSPolicy()
    if name == "priority":
        return PriorityPolicy()
    raise ValueError(f"unknown scheduling policy {name!r}; use 'fcfs' or 'priority'")
