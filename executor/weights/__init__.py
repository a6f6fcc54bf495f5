"""Weight loading: turns a `ModelSource` into a `LoadedModel` (config + HF-named tensors).

One entry point, `load_weights`, dispatching on the source kind to the GGUF, Hugging
Face directory and random-weight loaders. Every loader returns the same tensor names
and shapes (see `layout`), so the model code never cares where weights came from.
"""

from __future__ import annotations

import torch

from tessera.common.registry import ModelSource
from tessera.executor.weights.gguf import load_gguf
from tessera.executor.weights.hf import load_hf
from tessera.executor.weights.layout import ROPE_FREQS, LoadedModel, expected_shapes, num_parameters
from tessera.executor.weights.random import load_random

__all__ = ["ROPE_FREQS", "LoadedModel", "expected_shapes", "load_weights", "num_parameters"]


def load_weights(
    source: ModelSource,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = True,
    seed: int = 0,
) -> LoadedModel:
    """Load `source`'s config and weights as `dtype` on `device` (`seed`: random weights only).

    `progress=False` hides the tqdm bar.
    """
    if source.kind == "random":
        return load_random(source.name, dtype, device, progress, seed)
    if source.path is None:
        raise ValueError(f"model source {source.name!r} of kind {source.kind!r} has no path")
    if source.kind == "gguf":
        return load_gguf(source.path, source.name, dtype, device, progress)
    if source.kind == "hf":
        return load_hf(source.path, source.name, dtype, device, progress)
    raise ValueError(f"unknown model source kind {source.kind!r}; expected gguf, hf or random")
