"""GGUF files (llama.cpp's format): config from metadata, tensors dequantized to HF naming.

Reads the file with `gguf_file.read_gguf` (metadata scalars and the tensor directory;
tensor bytes memory-mapped), dequantizes each tensor on the target device (see
`dequant`), renames it to Hugging Face naming, and undoes the row permutation that
llama.cpp's converter applies to Q and K of "llama" models. Supports the "llama"
architecture (Llama, Mistral, SmolLM2, TinyLlama) and "qwen2".
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from gguf import GGUFReader
from tqdm import tqdm

from tessera.common.model_config import ModelConfig
from tessera.executor.weights.dequant import dequantize
from tessera.executor.weights.gguf_file import (
    GGUFArray,
    GGUFFile,
    GGUFTensor,
    from_reader,
    read_gguf,
)
from tessera.executor.weights.layout import ROPE_FREQS, LoadedModel, check_tensors

GGUF_ARCHITECTURES = ("llama", "qwen2")
_REQUIRED = object()

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": ROPE_FREQS,
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(.+)")


def load_gguf(
    path: str, name: str, dtype: torch.dtype, device: str | torch.device, progress: bool
) -> LoadedModel:
    """Read the GGUF at `path`; tensors in `dtype` on `device` (`rope_freqs` stays float32)."""
    file = read_gguf(path)
    config = gguf_config(file, name)
    with _one_cpu_thread(device):
        tensors = _read_tensors(file, config, name, dtype, device, progress)
    check_tensors(config, tensors)
    return LoadedModel(config=config, tensors=tensors)


@contextmanager
def _one_cpu_thread(device: str | torch.device) -> Iterator[None]:
    """Dequantizing is thousands of small ops: on the CPU, waking a second intra-op
    thread for each costs more than the op (loads 1.5x to 20x slower on 2 busy cores)."""
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _read_tensors(
    file: GGUFFile,
    config: ModelConfig,
    name: str,
    dtype: torch.dtype,
    device: str | torch.device,
    progress: bool,
) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for tensor in tqdm(file.tensors, desc=f"Loading {name}", unit="tensor", disable=not progress):
        hf_name = _hf_name(tensor.name)
        values = _dequantized(tensor, device)
        if hf_name == ROPE_FREQS:
            tensors[hf_name] = values
            continue
        if config.architecture == "llama":
            values = _unpermute_rotary(hf_name, values, config)
        tensors[hf_name] = values.to(dtype)
    return tensors


def gguf_config(source: GGUFFile | GGUFReader, name: str) -> ModelConfig:
    """The `ModelConfig` that a GGUF file's metadata describes (`read_gguf`'s reading of
    it, or a `gguf.GGUFReader`'s, which takes seconds longer)."""
    file = from_reader(source) if isinstance(source, GGUFReader) else source
    arch = _meta(file, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; Tessera reads "
            f"{', '.join(GGUF_ARCHITECTURES)} GGUF files"
        )
    tensor_names = {t.name: t for t in file.tensors}
    hidden = _meta(file, f"{arch}.embedding_length")
    num_heads = _meta(file, f"{arch}.attention.head_count")
    head_dim = _meta(file, f"{arch}.attention.key_length", hidden // num_heads)
    rotary_dim = _meta(file, f"{arch}.rope.dimension_count", head_dim)
    if rotary_dim != head_dim:
        raise ValueError(
            f"GGUF model {name!r} rotates {rotary_dim} of {head_dim} head dimensions; "
            "Tessera supports only full rotary embeddings"
        )
    eos = [_meta(file, f"tokenizer.ggml.{key}", None) for key in ("eos_token_id", "eot_token_id")]
    return ModelConfig(
        architecture=arch,
        vocab_size=_vocab_size(file, tensor_names["token_embd.weight"]),
        hidden_size=hidden,
        intermediate_size=_meta(file, f"{arch}.feed_forward_length"),
        num_hidden_layers=_meta(file, f"{arch}.block_count"),
        num_attention_heads=num_heads,
        num_key_value_heads=_meta(file, f"{arch}.attention.head_count_kv", num_heads),
        head_dim=head_dim,
        rms_norm_eps=_meta(file, f"{arch}.attention.layer_norm_rms_epsilon"),
        rope_theta=_meta(file, f"{arch}.rope.freq_base", 10000.0),
        max_position_embeddings=_meta(file, f"{arch}.context_length"),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        rope_scaling=_rope_scaling(file, arch),
        bos_token_id=_meta(file, "tokenizer.ggml.bos_token_id", None),
        eos_token_ids=tuple(dict.fromkeys(i for i in eos if i is not None)),
        name=name,
    )


def _meta(file: GGUFFile, key: str, default: Any = _REQUIRED) -> Any:
    value = file.metadata.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"GGUF file lacks the metadata key {key!r} that Tessera needs")
        return default
    return value


def _vocab_size(file: GGUFFile, embedding: GGUFTensor) -> int:
    rows = embedding.shape[-1]  # GGUF dims are innermost first: [hidden, vocab]
    tokens = file.metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
        return rows
    count = tokens.count if isinstance(tokens, GGUFArray) else 1
    if count != rows:
        raise ValueError(
            f"GGUF tokenizer lists {count} tokens but token_embd.weight has "
            f"{rows} rows; the file is inconsistent"
        )
    return rows


def _rope_scaling(file: GGUFFile, arch: str) -> dict | None:
    kind = _meta(file, f"{arch}.rope.scaling.type", None)
    factor = _meta(file, f"{arch}.rope.scaling.factor", None)
    legacy_factor = _meta(file, f"{arch}.rope.scale_linear", None)  # pre-2024 files
    if kind is None and legacy_factor is not None:
        kind, factor = "linear", legacy_factor
    if kind in (None, "none"):
        return None
    if kind != "linear":
        raise ValueError(
            f"GGUF rope scaling type {kind!r} is not supported; Tessera supports 'linear' "
            "(and Llama 3 frequency factors through the rope_freqs tensor)"
        )
    return {"rope_type": "linear", "factor": float(factor)}


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match[2] not in _LAYER_NAMES:
        raise ValueError(
            f"GGUF tensor {gguf_name!r} is not part of a llama/qwen2 decoder that Tessera "
            "knows how to run"
        )
    return f"model.layers.{match[1]}.{_LAYER_NAMES[match[2]]}"


def _dequantized(tensor: GGUFTensor, device: str | torch.device) -> torch.Tensor:
    # tensor.data: the file's bytes, uint8; ggml dims are innermost first.
    raw = torch.from_numpy(tensor.data).to(device)
    values = dequantize(tensor.name, raw, tensor.tensor_type, tensor.n_elements)
    return values.reshape(tuple(reversed(tensor.shape)))


def _unpermute_rotary(hf_name: str, w: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation, which turned HF's rotate-half layout of each
    head into interleaved pairs:

        HF rows of a head:   [x0 x1 ... x(h-1) | y0 y1 ... y(h-1)]     (h = head_dim / 2)
        GGUF rows of a head: [x0 y0 x1 y1 ... x(h-1) y(h-1)]
    """
    if ".q_proj." in hf_name:
        n_head = config.num_attention_heads
    elif ".k_proj." in hf_name:
        n_head = config.num_key_value_heads
    else:
        return w
    rows, rest = w.shape[0], w.shape[1:]
    # w: [n_head * half * 2, *rest] -> [n_head, half, 2, *rest] -> [n_head, 2, half, *rest]
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).transpose(1, 2).reshape(w.shape)
