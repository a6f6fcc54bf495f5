"""Model classes, one module per architecture family, and the registry that picks one.

A family is one forward pass that serves several checkpoints through ``ModelConfig``
flags (``llama``: Llama 2/3, Mistral, Qwen2, SmolLM2, TinyLlama). ``MODEL_CLASSES`` maps
``ModelConfig.architecture`` to the class that runs it, and ``model_class`` looks it up.
Every name in ``common.model_config.SUPPORTED_ARCHITECTURES`` has an entry here (the
common layer is torch-free, so it cannot import these classes; a test holds the two
lists together). A new family is a new module here plus its entries below.
"""

from __future__ import annotations

from tessera.common.model_config import ModelConfig
from tessera.executor.models.llama import LlamaForCausalLM

__all__ = ["MODEL_CLASSES", "LlamaForCausalLM", "model_class"]

# ModelConfig.architecture -> the class that runs it; all take the same constructor
# arguments (config, tensors, device, max_positions, attention, fused_kernels).
MODEL_CLASSES: dict[str, type] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,  # q/k/v bias, from ModelConfig.attention_bias
}


def model_class(config: ModelConfig) -> type:
    """The class that runs ``config.architecture``.

    Raises ValueError for an architecture that no module here implements.
    """
    cls = MODEL_CLASSES.get(config.architecture)
    if cls is None:
        raise ValueError(
            f"no model class for architecture {config.architecture!r}; "
            f"the executor implements {', '.join(sorted(MODEL_CLASSES))}"
        )
    return cls
