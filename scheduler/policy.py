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
    # Whether admission prefers, among waiting requests of the head's priority, the
    # ones with the longest cached prefix (Scheduler._admission_order).
    prefers_cached_prefix: ClassVar[bool]

    def key(self, request: Request) -> tuple[int, ...]: ...


@dataclass(slots=True, frozen=True)
class FCFSPolicy:
    preempts_for_waiting: ClassVar[bool] = False
    prefers_cached_prefix: ClassVar[bool] = False

    def key(self, request: Request) -> tuple[int, ...]:
        return (request.arrival_index,)


@dataclass(slots=True, frozen=True)
class PriorityPolicy:
    """Lower priority numbers first; first come, first served within a priority."""

    preempts_for_waiting: ClassVar[bool] = True
    prefers_cached_prefix: ClassVar[bool] = False

    def key(self, request: Request) -> tuple[int, ...]:
        return (request.priority, request.arrival_index)


@dataclass(slots=True, frozen=True)
class LongestPrefixMatchPolicy:
    """SGLang's "lpm": among waiting requests of the same priority, admit first the
    ones whose longest prefix is cached (they cost the fewest tokens to compute, and
    admitting them before their prefix is evicted keeps it useful).

    The key (queue order, preemption order) is the priority policy's; the preference
    is applied at admission over the first LPM_WINDOW waiting requests, and a request
    that later arrivals have overtaken in LPM_MAX_OVERTAKEN steps goes first among its
    priority, so nothing starves. It never preempts a running request for a waiting
    one: admission order is no longer arrival order, so that would only churn work.
    """

    preempts_for_waiting: ClassVar[bool] = False
    prefers_cached_prefix: ClassVar[bool] = True

    def key(self, request: Request) -> tuple[int, ...]:
        return (request.priority, request.arrival_index)


# Waiting requests whose cached prefix lpm looks up per step (a hash lookup per block
# each), and how many steps of being overtaken a request bears before it goes first.
LPM_WINDOW = 128
LPM_MAX_OVERTAKEN = 16


def make_policy(name: str) -> SchedulingPolicy:
    if name == "fcfs":
        return FCFSPolicy()
    if name == "priority":
        return PriorityPolicy()
    if name == "lpm":
        return LongestPrefixMatchPolicy()
    raise ValueError(f"unknown scheduling policy {name!r}; use 'fcfs', 'priority' or 'lpm'")
