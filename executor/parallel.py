"""Tensor parallelism: the process group of an engine's ranks, how weights split over
it, and the few collectives the model runs.

An engine of N ranks runs one step together, one process per device. Each rank holds
a slice of every large matrix (Megatron's split, two collectives per layer):

    q/k/v, gate/up   column-parallel: rank r holds rows [r*n/N, (r+1)*n/N) of [n, hidden];
                     its heads' q/k/v (its slice of the MLP) come out, no communication
    o, down          row-parallel: rank r holds those columns; each rank's product is a
                     partial sum, all-reduced into the full hidden state
    embed, lm_head   vocabulary-parallel: rank r holds the rows of tokens
                     [r*V/N, (r+1)*V/N); an embedding is all-reduced (the owner's row,
                     zeros elsewhere), logits are all-gathered for sampling

KV heads split like q heads when N divides them; where N exceeds them (SmolLM2 at N = 3
has 3; Llama-3-8B at N = 16 would have 8), each rank holds the one KV head its q heads
read, replicated over N / num_key_value_heads ranks. Norms and rotary tables are
replicated.

Collectives go through torch.distributed: gloo on the CPU, NCCL on CUDA (captured in
the CUDA graphs like any kernel). At N = 1 there is no group and no collective: the
model takes ``TPGroup.single()`` and its path is the single-device one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tessera.common.model_config import ModelConfig
from tessera.common.registry import ModelSource

logger = logging.getLogger(__name__)

# A rank that waits longer than this on a collective gives up (its peer died or hung);
# the scheduler's step watchdog usually kills the group first.
_COLLECTIVE_TIMEOUT = timedelta(minutes=10)


# -- the process group -----------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class TPGroup:
    """This rank's place in the engine; every collective is a no-op at world_size 1."""

    rank: int = 0
    world_size: int = 1

    @staticmethod
    def single() -> TPGroup:
        return TPGroup()

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place (x: every rank's partial sum, same shape)."""
        if self.world_size > 1:
            dist.all_reduce(x)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] per rank -> [..., N*n], rank order along the last dim."""
        if self.world_size == 1:
            return x
        # One buffer, not a list: the same call captures in a CUDA graph.
        x = x.contiguous()
        out = x.new_empty((self.world_size * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x)  # [N*B, ..., n], rank-major
        out = out.view(self.world_size, *x.shape).movedim(0, -2)  # [B, ..., N, n]
        return out.reshape(*x.shape[:-1], self.world_size * x.shape[-1])

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x on every rank, in place (other ranks pass a buffer of its shape)."""
        if self.world_size > 1:
            dist.broadcast(x, src=0)
        return x

    def min_int(self, value: int) -> int:
        """The smallest of the ranks' values (each rank's own KV pool size, say)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


# all_gather_into_tensor was renamed all_gather_single; take whichever this torch has.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_group(
    rank: int, world_size: int, init_method: str, device: torch.device
) -> tuple[TPGroup, torch.device]:
    """Join the engine's process group; returns the group and this rank's device.

    ``device`` "cuda" (no index) becomes cuda:rank. On the CPU the ranks share the
    cores: each takes cores / N threads, so N ranks do not oversubscribe them.
    """
    if world_size == 1:
        return TPGroup.single(), device
    if not init_method:
        raise ValueError("tensor_parallel_size > 1 needs dist_init_method (tcp:// or file://)")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=_COLLECTIVE_TIMEOUT,
    )
    logger.info("rank %d of %d joined (%s on %s)", rank, world_size, backend, device)
    return TPGroup(rank, world_size), device


def destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# -- how a model splits ------------------------------------------------------------------


def check_splittable(config: ModelConfig, world_size: int) -> None:
    """ValueError naming the dimension that ``world_size`` ranks cannot split."""
    if world_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {world_size}")
    if world_size == 1:
        return
    name = config.name or "the model"
    for field in ("num_attention_heads", "intermediate_size", "vocab_size"):
        size = getattr(config, field)
        if size % world_size:
            raise ValueError(
                f"tensor_parallel_size {world_size} cannot split {name}: {field} {size} "
                f"is not a multiple of {world_size}"
            )
    kv = config.num_key_value_heads
    if kv % world_size and world_size % kv:
        raise ValueError(
            f"tensor_parallel_size {world_size} cannot split {name}: num_key_value_heads "
            f"{kv} is neither a multiple of {world_size} nor a divisor of it (KV heads are "
            "split, or replicated where the ranks outnumber them)"
        )


def local_heads(config: ModelConfig, group: TPGroup) -> tuple[int, int]:
    """(q heads, KV heads) that one rank holds."""
    n = group.world_size
    return config.num_attention_heads // n, max(1, config.num_key_value_heads // n)


@dataclass(slots=True, frozen=True)
class TensorShard:
    """Which slice of each weight one rank holds: ``spec(name)`` -> (dim, start, stop),
    or None for a replicated tensor."""

    config: ModelConfig
    rank: int
    world_size: int

    def spec(self, name: str) -> tuple[int, int, int] | None:
        c, r, n = self.config, self.rank, self.world_size
        if n == 1:
            return None
        d = c.head_dim
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return _part(0, c.vocab_size, r, n)
        if ".self_attn.q_proj." in name:
            return _part(0, c.num_attention_heads * d, r, n)
        if ".self_attn.o_proj." in name:
            return _part(1, c.num_attention_heads * d, r, n)
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            kv = c.num_key_value_heads
            if kv % n == 0:
                return _part(0, kv * d, r, n)
            head = r * kv // n  # replicated: the KV head this rank's q heads read
            return 0, head * d, (head + 1) * d
        if ".mlp.gate_proj." in name or ".mlp.up_proj." in name:
            return _part(0, c.intermediate_size, r, n)
        if ".mlp.down_proj." in name:
            return _part(1, c.intermediate_size, r, n)
        return None

    def take(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a full tensor, as a tensor of its own (the full one can go)."""
        spec = self.spec(name)
        if spec is None:
            return t
        dim, start, stop = spec
        return t.narrow(dim, start, stop - start).clone()


def _part(dim: int, size: int, rank: int, world_size: int) -> tuple[int, int, int]:
    step = size // world_size
    return dim, rank * step, (rank + 1) * step


def shard_tensors(tensors: dict[str, torch.Tensor], shard: TensorShard) -> None:
    """Replace every split tensor of ``tensors`` by this rank's slice, in place."""
    for name in list(tensors):
        tensors[name] = shard.take(name, tensors[name])


def read_model_config(source: ModelSource) -> ModelConfig:
    """A model's shape without its weights (to refuse a split before any process starts)."""
    if source.kind == "random":
        from tessera.common.registry import random_config

        return random_config(source.name)
    if source.kind == "hf":
        from pathlib import Path

        from tessera.executor.weights.hf import hf_config

        return hf_config(Path(source.path), source.name)
    if source.kind == "gguf":
        from tessera.executor.weights.gguf import gguf_config
        from tessera.executor.weights.gguf_file import read_gguf

        return gguf_config(read_gguf(source.path), source.name)
    raise ValueError(f"unknown model source kind {source.kind!r}")


# -- the layers ---------------------------------------------------------------------------


def column_parallel_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [T, in] (whole) @ this rank's rows of W -> [T, out/N], this rank's slice."""
    return F.linear(x, weight, bias)


def row_parallel_linear(x: torch.Tensor, weight: torch.Tensor, group: TPGroup) -> torch.Tensor:
    """x [T, in/N] (this rank's slice) @ this rank's columns of W -> [T, out], summed."""
    return group.all_reduce(F.linear(x, weight))


def vocab_parallel_embedding(
    input_ids: torch.Tensor, weight: torch.Tensor, group: TPGroup
) -> torch.Tensor:
    """ids [T] -> [T, hidden]; weight: this rank's rows of the table, [V/N, hidden].

    Each rank looks up the ids it owns and writes zeros for the others; the all-reduce
    leaves every row with its owner's values.
    """
    if not group.is_parallel:
        return F.embedding(input_ids, weight)
    rows = weight.shape[0]
    start = group.rank * rows
    local = input_ids - start
    outside = (local < 0) | (local >= rows)
    h = F.embedding(local.masked_fill(outside, 0), weight)
    h.masked_fill_(outside.unsqueeze(-1), 0.0)
    return group.all_reduce(h)


def parallel_lm_head(hidden: torch.Tensor, weight: torch.Tensor, group: TPGroup) -> torch.Tensor:
    """hidden [B, hidden] @ this rank's vocabulary rows -> logits [B, V], gathered."""
    return group.all_gather_last(F.linear(hidden, weight))
