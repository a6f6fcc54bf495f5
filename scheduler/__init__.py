"""Scheduler: decides which tokens of which requests run in each step, and where
their KV cache lives. Imports no torch (nor anything that does).
"""

from tessera.common.plan import StopConditions
from tessera.scheduler.block_pool import BlockPool
from tessera.scheduler.config import SchedulerConfig
from tessera.scheduler.kv_cache_manager import KVCacheManager
from tessera.scheduler.outputs import RequestOutput
from tessera.scheduler.policy import FCFSPolicy, PriorityPolicy, SchedulingPolicy, make_policy
from tessera.scheduler.request import Request, RequestStatus
from tessera.scheduler.scheduler import RequestRejected, Scheduler

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
