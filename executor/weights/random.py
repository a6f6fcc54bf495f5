"""Random weights of a named shape (see `executor.registry.RANDOM_SHAPES`), for benchmarks.

Deterministic: each tensor is drawn from a generator seeded by (seed, tensor name), so
a tensor's values do not depend on which others exist or on the order they are made.
Tensors are created directly on the target device in the target dtype, so an 8B model
in bf16 never needs float32 host memory; on device "meta" only shapes are made.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from tessera.common.registry import random_config
from tessera.executor.weights.layout import LoadedModel, expected_shapes

if TYPE_CHECKING:
    from tessera.executor.parallel import TensorShard

INIT_STD = 0.02  # the std transformers initializes these models with; keeps activations finite


def load_random(
    shape: str,
    dtype: torch.dtype,
    device: str | torch.device,
    progress: bool,
    seed: int = 0,
    shard: TensorShard | None = None,
) -> LoadedModel:
    """Weights of random shape `shape`: linears and embeddings ~ N(0, 0.02^2), norms = 1.

    With `shard` (tensor parallel), each tensor is drawn whole, so that every N gets the
    same model, and cut to this rank's slice before the next one is drawn: a rank holds
    its slices and one whole tensor at most (Llama-3.1-70B in bf16 is 141 GB whole, more
    than one GPU holds; its largest tensor is 2.1 GB)."""
    config = random_config(shape)
    device = torch.device(device)
    shapes = expected_shapes(config)
    tensors = {}
    for name, size in tqdm(
        shapes.items(), desc=f"Random {shape}", unit="tensor", disable=not progress
    ):
        tensor = _random_tensor(name, size, dtype, device, seed)
        tensors[name] = tensor if shard is None else shard.take(name, tensor)
        del tensor  # (a split one's whole goes now, not when the next one is drawn)
    return LoadedModel(config=config, tensors=tensors)


def _random_tensor(
    name: str, size: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int
) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(size, dtype=dtype, device=device)
    if device.type == "meta":
        return torch.empty(size, dtype=dtype, device=device)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(size, generator=generator, dtype=dtype, device=device).mul_(INIT_STD)
