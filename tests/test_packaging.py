"""The built wheel, installed into a fresh virtual environment beside transformers and
Hugging Face's ``kernels`` package: both import in one process, every ``tessera.*`` module
imports from the wheel (not the checkout), and the offline API answers on the default
model with the tokens transformers' own greedy search gives.

The heavy dependencies (torch, transformers, kernels, ...) come from the test's own
environment through a ``.pth`` path line: such a line puts that site directory on the path
without running its ``.pth`` files, so the checkout's editable install is not active
there and ``tessera`` can only come from the wheel.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

PROBE = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys
    import kernels, transformers  # Hugging Face's; a project folder named kernels shadowed it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tessera
    from tessera import LLM, SamplingParams

    modules = []
    for info in pkgutil.walk_packages(tessera.__path__, "tessera."):
        if info.name.endswith("__main__"):
            continue  # running one starts a process
        modules.append(importlib.import_module(info.name).__file__)
    bare = {}
    for name in ("kernels", "executor", "scheduler", "services", "proto", "tokenizer_svc",
                 "common"):
        spec = importlib.util.find_spec(name)
        bare[name] = spec.origin if spec else None

    from tessera.common.registry import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    prompt = tok("The capital of France is", add_special_tokens=False).input_ids
    import torch
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    llm = LLM(model="smollm2-135m-instruct", device="cpu", show_progress=False)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    print(json.dumps({
        "kernels": kernels.__file__, "transformers": transformers.__version__,
        "tessera": tessera.__file__, "modules": modules, "bare": bare,
        "hf": hf_out[0, len(prompt):].tolist(), "ours": list(out[0].outputs[0].token_ids),
    }))
    """
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(ROOT)],
        check=True, timeout=300,
    )  # fmt: skip
    (whl,) = out.glob("tessera-*.whl")
    return whl


def test_wheel_installs_beside_hf_kernels_and_serves_the_default_model(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    fresh_site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    ours = sysconfig.get_path("purelib")
    (Path(fresh_site) / "deps.pth").write_text(ours + "\n")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True, timeout=300,
    )  # fmt: skip
    # cwd: an empty folder, so nothing of the checkout is reachable by the path either
    probe = subprocess.run(
        [python, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-3000:]
    got = json.loads(probe.stdout.strip().splitlines()[-1])

    assert Path(got["kernels"]).is_relative_to(ours), got["kernels"]
    assert Path(got["tessera"]).is_relative_to(fresh_site)
    stages = {"common", "executor", "kernels", "proto", "scheduler", "services",
              "tokenizer_svc"}  # fmt: skip
    seen = {Path(m).relative_to(fresh_site).parts[1] for m in got["modules"]}
    assert stages <= seen, stages - seen
    assert all(Path(m).is_relative_to(fresh_site) for m in got["modules"])
    # a bare stage name finds no project folder (kernels: Hugging Face's package)
    assert not any(
        origin and Path(origin).is_relative_to(ROOT / name) for name, origin in got["bare"].items()
    ), got["bare"]
    assert got["bare"]["kernels"] is not None and got["bare"]["executor"] is None
    assert got["ours"] == got["hf"]
