"""Default sampling settings of a model, as its ``generation_config.json`` states them.

A request that leaves ``temperature`` (or ``top_p``, ``top_k``, ``min_p``,
``repetition_penalty``, ``max_tokens``) unset gets the model's value, as transformers'
``generate`` and vLLM's ``--generation-config auto`` do; the request's own value always
wins. ``--generation-config none`` keeps the API's defaults (temperature 1.0, ...).

The default model (SmolLM2-135M-Instruct, a GGUF file without a generation config)
gets the settings its model card suggests, temperature 0.2 and top_p 0.9: at the API's
temperature 1.0 a 135M model writes noise.

Torch-free: the gateway reads it once at start.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tessera.common.registry import DEFAULT_MODEL, ModelSource

GENERATION_CONFIG_CHOICES = ("auto", "none")

# generation_config.json key -> sampling field; do_sample false means greedy.
_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}
_DEFAULT_MODEL_SETTINGS = {"temperature": 0.2, "top_p": 0.9}


def default_sampling(source: ModelSource, mode: str = "auto") -> dict[str, Any]:
    """The sampling fields a request without them gets: {} with mode "none", for random
    weights, or for a model whose generation config sets none of them."""
    if mode not in GENERATION_CONFIG_CHOICES:
        raise ValueError(f"generation_config must be one of {GENERATION_CONFIG_CHOICES}, "
                         f"got {mode!r}")
    if mode == "none" or source.path is None:
        return {}
    if source.name == DEFAULT_MODEL and source.kind == "gguf":
        return dict(_DEFAULT_MODEL_SETTINGS)
    directory = Path(source.path) if source.kind == "hf" else Path(source.path).parent
    return sampling_from_generation_config(directory / "generation_config.json")


def sampling_from_generation_config(path: Path) -> dict[str, Any]:
    """The sampling fields ``path`` sets ({} when there is no such file). A config with
    ``do_sample: false`` means greedy decoding: temperature 0."""
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    out: dict[str, Any] = {}
    for key, name in _KEYS.items():
        value = config.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = value
    if config.get("do_sample") is False:
        out["temperature"] = 0.0
    return out
