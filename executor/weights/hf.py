"""Hugging Face model directories: config.json (+ generation_config.json) and safetensors.

Owns reading a transformers-style checkpoint, sharded (model.safetensors.index.json)
or not, for the Llama, Mistral and Qwen2 architectures. Tensors already carry HF
names; this module only filters, converts and checks them.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from tessera.common.model_config import ModelConfig
from tessera.executor.weights.layout import LoadedModel, check_tensors
from tessera.executor.weights.quant import convert_checkpoint, is_quantized_part, quant_config

if TYPE_CHECKING:
    from tessera.executor.parallel import TensorShard

HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_INDEX_FILE = "model.safetensors.index.json"
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # buffers that old checkpoints saved


def load_hf(
    path: str,
    name: str,
    dtype: torch.dtype,
    device: str | torch.device,
    progress: bool,
    shard: TensorShard | None = None,
    quantization: str = "auto",
) -> LoadedModel:
    """Read the HF checkpoint in directory `path`; tensors in `dtype` on `device`.

    A GPTQ / AWQ checkpoint (`quantization`: see executor.weights.quant) gives its
    linears as 4-bit weight objects, dequantized to `dtype` on the CPU.

    With `shard`, only this rank's slice of each split tensor is read from the file;
    the full shapes are checked against the config first."""
    directory = Path(path)
    config = hf_config(directory, name)
    quant = quant_config(_read_json(directory / "config.json"), quantization, str(directory))
    if quant is not None and shard is not None:
        raise ValueError("tensor parallel over 4-bit (GPTQ / AWQ) weights is not supported yet")
    tensors: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        files = [
            stack.enter_context(safe_open(file, framework="pt", device="cpu"))
            for file in _safetensors_files(directory)
        ]
        names = [(f, key) for f in files for key in f.keys() if _wanted(key, config)]
        if shard is not None:  # shapes only: meta tensors
            shapes = {key: torch.empty(f.get_slice(key).get_shape(), device="meta")
                      for f, key in names}  # fmt: skip
            check_tensors(config, shapes)
        for f, key in tqdm(names, desc=f"Loading {name}", unit="tensor", disable=not progress):
            spec = shard.spec(key) if shard is not None else None
            if spec is None:
                tensor = f.get_tensor(key)
            else:
                dim, start, stop = spec
                part = f.get_slice(key)
                tensor = part[start:stop] if dim == 0 else part[:, start:stop]
            keep = quant is not None and is_quantized_part(key)  # int32 codes, fp16 scales
            tensors[key] = tensor.to(device=device, dtype=None if keep else dtype)
    if quant is not None:
        cpu = torch.device(device).type == "cpu"
        tensors = convert_checkpoint(tensors, config, quant, dtype, dequantize=cpu)
    if shard is None:
        check_tensors(config, tensors)
    return LoadedModel(config=config, tensors=tensors)


def hf_config(directory: Path, name: str) -> ModelConfig:
    """The `ModelConfig` of the checkpoint in `directory` (old and transformers-5 layouts)."""
    config = _read_json(directory / "config.json")
    generation = _read_json(directory / "generation_config.json", missing_ok=True)
    arch = _architecture(config)
    _check_supported(config, arch)
    hidden = config["hidden_size"]
    num_heads = config["num_attention_heads"]
    rope_theta, rope_scaling = _rope(config)
    return ModelConfig(
        architecture=arch,
        vocab_size=config["vocab_size"],
        hidden_size=hidden,
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=num_heads,
        num_key_value_heads=config.get("num_key_value_heads") or num_heads,
        head_dim=config.get("head_dim") or hidden // num_heads,
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        max_position_embeddings=config["max_position_embeddings"],
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases; Llama says so in its config.
        attention_bias=arch == "qwen2" or bool(config.get("attention_bias", False)),
        rope_scaling=rope_scaling,
        bos_token_id=_first_present("bos_token_id", config, generation),
        eos_token_ids=_eos_token_ids(config, generation),
        name=name,
    )


def _read_json(path: Path, missing_ok: bool = False) -> dict[str, Any]:
    if missing_ok and not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc


def _architecture(config: dict[str, Any]) -> str:
    architectures = config.get("architectures") or []
    for architecture in architectures:
        if architecture in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[architecture]
    raise ValueError(
        f"config.json architectures {architectures} are not supported; Tessera runs "
        f"{', '.join(HF_ARCHITECTURES)}"
    )


def _check_supported(config: dict[str, Any], arch: str) -> None:
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported; Tessera's MLP uses silu")
    if config.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported; Tessera's MLP has no biases")
    window = config.get("sliding_window")
    uses_window = config.get("use_sliding_window", arch == "mistral")
    if uses_window and window is not None and window < config["max_position_embeddings"]:
        raise ValueError(
            f"sliding-window attention (window {window} < max_position_embeddings "
            f"{config['max_position_embeddings']}) is not supported. Set max_position_embeddings "
            f"to {window} in config.json to run with the window as the context limit."
        )


def _rope(config: dict[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, HF-style rope scaling dict or None). transformers 5 writes both in
    `rope_parameters`; older configs write `rope_theta` and `rope_scaling` (keyed "type" or
    "rope_type")."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = params.pop("rope_theta", config.get("rope_theta", 10000.0))
    if "type" in params:
        params.setdefault("rope_type", params.pop("type"))
    if params.get("rope_type", "default") == "default":
        return theta, None
    return theta, params


def _first_present(key: str, *configs: dict[str, Any]) -> Any:
    for config in configs:
        if config.get(key) is not None:
            return config[key]
    return None


def _eos_token_ids(*configs: dict[str, Any]) -> tuple[int, ...]:
    ids: list[int] = []
    for config in configs:
        value = config.get("eos_token_id")
        ids.extend([value] if isinstance(value, int) else value or [])
    return tuple(dict.fromkeys(ids))


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / _INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index)["weight_map"]
        return [directory / file for file in sorted(set(weight_map.values()))]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"{directory} has no *.safetensors files; Tessera does not read pytorch_model.bin. "
            "Convert the checkpoint with transformers' save_pretrained(safe_serialization=True)."
        )
    return files


def _wanted(key: str, config: ModelConfig) -> bool:
    if key.endswith(_IGNORED_SUFFIXES):
        return False
    # Some tied checkpoints still store lm_head.weight, a copy of the embeddings.
    return not (config.tie_word_embeddings and key == "lm_head.weight")
