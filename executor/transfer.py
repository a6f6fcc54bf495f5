"""Copies between host and device that do not make the host wait for the device.

A plain ``tensor.to("cuda")`` from pageable memory synchronizes the stream: the host
waits for every kernel already queued. A pipelined executor lays out step N+1 while
the GPU runs step N, so its copies go through pinned memory, asynchronously (the
caching host allocator keeps each pinned buffer until its copy is done).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_device(
    values: np.ndarray | torch.Tensor | Sequence[int] | Sequence[float],
    device: torch.device | str,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``values`` as a tensor on ``device`` (of ``dtype``), without a host sync on CUDA."""
    if isinstance(values, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(values))
    elif isinstance(values, torch.Tensor):
        t = values
    else:
        t = torch.tensor(values, dtype=dtype)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def to_host_async(t: torch.Tensor) -> torch.Tensor:
    """A device tensor copied into pinned host memory, asynchronously: read it only
    after an event recorded behind the copy has completed. Host tensors pass through."""
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host
