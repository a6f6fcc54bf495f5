"""Tessera: an LLM serving engine. ``from tessera import LLM, SamplingParams``."""

from tessera.common.sampling_params import SamplingParams
from tessera.outputs import CompletionOutput, RequestOutput


def __getattr__(name: str):
    # LLM pulls in torch; import it only when asked for, so light tools stay light.
    if name == "LLM":
        from tessera.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
