"""What every loader returns: a `LoadedModel`, its tensors in Hugging Face naming.

One table of names and shapes, derived from a `ModelConfig`, that random weights are
generated from and that the GGUF and Hugging Face loaders check their output against,
so a model never sees a missing, extra or misshapen tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tessera.common.model_config import ModelConfig

# Per-frequency divisors of the rotary inverse frequencies, shipped by Llama 3 GGUFs
# instead of rope-scaling metadata: the model uses inv_freq / rope_freqs.
ROPE_FREQS = "rope_freqs"


@dataclass(slots=True)
class LoadedModel:
    """A model's config and weights, ready for the model code.

    tensors: `model.embed_tokens.weight`, `model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`
    (+ `.bias` for q/k/v when `config.attention_bias`), `model.layers.{i}.mlp.{gate,up,down}
    _proj.weight`, `model.layers.{i}.{input,post_attention}_layernorm.weight`,
    `model.norm.weight`, `lm_head.weight` only when embeddings are not tied, and
    `rope_freqs` ([head_dim // 2] float32) when a Llama 3 GGUF carries per-frequency
    rotary divisors: the model must then use inv_freq / rope_freqs (the file has no
    rope-scaling metadata; `config.rope_scaling` is None).
    """

    config: ModelConfig
    tensors: dict[str, torch.Tensor]


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, name -> shape ([out_features, in_features] for linears)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}"
        shapes[f"{prefix}.input_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}.self_attn.q_proj.weight"] = (q_rows, hidden)
        shapes[f"{prefix}.self_attn.k_proj.weight"] = (kv_rows, hidden)
        shapes[f"{prefix}.self_attn.v_proj.weight"] = (kv_rows, hidden)
        if config.attention_bias:
            shapes[f"{prefix}.self_attn.q_proj.bias"] = (q_rows,)
            shapes[f"{prefix}.self_attn.k_proj.bias"] = (kv_rows,)
            shapes[f"{prefix}.self_attn.v_proj.bias"] = (kv_rows,)
        shapes[f"{prefix}.self_attn.o_proj.weight"] = (hidden, q_rows)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}.mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{prefix}.mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{prefix}.mlp.down_proj.weight"] = (hidden, inter)
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def num_parameters(config: ModelConfig) -> int:
    """Parameter count of the model (tied embeddings counted once), without materializing it."""
    return sum(math.prod(shape) for shape in expected_shapes(config).values())


def check_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Raise ValueError unless `tensors` holds exactly the expected names and shapes
    (plus an optional `rope_freqs` of shape [head_dim // 2])."""
    expected = expected_shapes(config)
    if ROPE_FREQS in tensors:
        expected[ROPE_FREQS] = (config.head_dim // 2,)
    missing = sorted(expected.keys() - tensors.keys())
    extra = sorted(tensors.keys() - expected.keys())
    if missing or extra:
        raise ValueError(
            f"checkpoint {config.name!r} does not match its config: "
            f"missing tensors {_few(missing)}, unexpected tensors {_few(extra)}"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"checkpoint {config.name!r}: tensor {name} has shape "
                f"{tuple(tensors[name].shape)}, but the config implies {shape}"
            )


def _few(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
