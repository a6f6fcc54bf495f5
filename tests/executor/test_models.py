"""The model registry covers exactly the architectures the config accepts, and names
the architecture it lacks."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tessera.common import model_config
from tessera.common.model_config import SUPPORTED_ARCHITECTURES
from tessera.common.registry import random_config
from tessera.executor.models import MODEL_CLASSES, LlamaForCausalLM, model_class


def test_the_registry_and_the_supported_architectures_agree():
    assert sorted(MODEL_CLASSES) == sorted(SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize("architecture", SUPPORTED_ARCHITECTURES)
def test_every_supported_architecture_has_a_model_class(architecture):
    config = replace(random_config("smollm2-135m"), architecture=architecture)
    cls = model_class(config)
    # What the model runner calls on it.
    assert isinstance(cls, type) and callable(cls.forward) and callable(cls.compute_logits)
    if architecture in ("llama", "mistral", "qwen2"):
        assert cls is LlamaForCausalLM


def test_an_architecture_without_a_model_class_is_named(monkeypatch):
    # As when common/ learns a name before its model module lands.
    monkeypatch.setattr(model_config, "SUPPORTED_ARCHITECTURES", (*SUPPORTED_ARCHITECTURES, "gpt2"))
    config = replace(random_config("smollm2-135m"), architecture="gpt2")
    with pytest.raises(ValueError, match="'gpt2'") as info:
        model_class(config)
    for architecture in SUPPORTED_ARCHITECTURES:
        assert architecture in str(info.value)
