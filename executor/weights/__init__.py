"""Weight loading: turns a `ModelSource` into a `LoadedModel` (config + HF-named tensors).

One entry point, `load_weights`, dispatching on the source kind to the GGUF, Hugging
Face directory and random-weight loaders. Every loader returns the same tensor names
and shapes (see `layout`), so the model code never cares where weights came from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tessera.common.registry import ModelSource
from tessera.executor.weights.gguf import load_gguf
from tessera.executor.weights.hf import load_hf
from tessera.executor.weights.layout import ROPE_FREQS, LoadedModel, expected_shapes, num_parameters
from tessera.executor.weights.quant import load_random_quantized
from tessera.executor.weights.random import load_random

if TYPE_CHECKING:
    from tessera.executor.parallel import TensorShard

__all__ = ["ROPE_FREQS", "LoadedModel", "expected_shapes", "load_weights", "num_parameters"]


def load_weights(
    source: ModelSource,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = True,
    seed: int = 0,
    shard: TensorShard | None = None,
    quantization: str = "auto",
) -> LoadedModel:
    """Load `source`'s config and weights as `dtype` on `device` (`seed`: random weights only).

    `progress=False` hides the tqdm bar. With `shard` (tensor parallel), the split
    tensors are this rank's slices: read alone from a safetensors file; sliced after
    reading from GGUF (quantized blocks dequantize whole) and random weights (each
    drawn whole, so that every N gets the same model, and sliced before the next).
    `quantization` (auto | none | gptq | awq): what a Hugging Face checkpoint must be;
    gptq or awq with random weights draws random 4-bit linears (benchmarks).
    """
    if source.kind == "hf" and source.path is not None:
        return load_hf(source.path, source.name, dtype, device, progress, shard, quantization)
    if quantization not in ("auto", "none"):
        return load_random_quantized(source, quantization, dtype, device, progress, seed, shard)
    if source.kind == "random":  # sliced tensor by tensor, as each is drawn
        return load_random(source.name, dtype, device, progress, seed, shard)
    if source.path is None:
        raise ValueError(f"model source {source.name!r} of kind {source.kind!r} has no path")
    if source.kind == "gguf":
        loaded = load_gguf(source.path, source.name, dtype, device, progress)
    else:
        raise ValueError(f"unknown model source kind {source.kind!r}; expected gguf, hf or random")
    if shard is not None:
        from tessera.executor.parallel import shard_tensors

        shard_tensors(loaded.tensors, shard)
    return loaded
