"""Scheduler: decides which tokens of which requests run in each step, and where
their KV cache lives. Imports no torch (nor anything that does).
"""

from scheduler.block_pool import BlockPool
from scheduler.config import SchedulerConfig
from scheduler.kv_cache_manager import KVCacheManager
from scheduler.outputs import RequestOutput
from scheduler.policy import FCFSPolicy, PriorityPolicy, SchedulingPolicy, make_policy
from scheduler.request import Request, RequestStatus, StopConditions
from scheduler.scheduler import RequestRejected, Scheduler

__all__ = [
    "BlockPool",
    "FCFSPolicy",
    "KVCacheManager",
    "PriorityPolicy",
    "Request",
    "RequestOutput",
    "RequestRejected",
    "RequestStatus",
    "Scheduler",
    "SchedulerConfig",
    "SchedulingPolicy",
    "StopConditions",
    "make_policy",
]
