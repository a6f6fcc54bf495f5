"""How far each Tessera numeric path moves SmolLM2's logprobs from Hugging Face float32.

Teacher-forced: the prompts of tests/tessera/test_greedy_vs_hf.py, each followed by
0..31 tokens of HF's own greedy continuation (320 positions). Every path predicts the
next token with its top-20 logprobs, compared with HF's at the same position. Reports
the largest / p99 / median absolute error over those top-20 tokens, and, where a path's
argmax differs from HF's, how far apart HF's logprobs of the two tokens were (the
"near-tie" the greedy tests must tolerate). Without CUDA it runs only the float32
torch path on a few positions, as a smoke check.

    python benchmarks/precision.py --json benchmarks/results/precision_smollm2_h100.json
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import tempfile

import torch


def _greedy_test():
    """The greedy test's prompts, loaded by path: the repository root is never put on
    sys.path (its folders would shadow installed packages such as Hugging Face's kernels)."""
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "tessera", "test_greedy_vs_hf.py")
    spec = importlib.util.spec_from_file_location("greedy_vs_hf", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

PATHS = {
    "float32 triton": dict(dtype="float32", attention_backend="triton"),
    "float32 torch": dict(dtype="float32", attention_backend="torch"),
    "bfloat16 torch": dict(dtype="bfloat16", attention_backend="torch"),
    "bfloat16 triton": dict(dtype="bfloat16", attention_backend="triton"),
    "float32 triton, fp8 KV": dict(
        dtype="float32", attention_backend="triton", kv_cache_dtype="fp8"
    ),
}


def reference(device: str, num_tokens: int, num_prompts: int):
    """Teacher-forced sequences and HF float32's next-token logprobs after each."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tessera.common.registry import smollm2_gguf_path

    path = smollm2_gguf_path()
    d = tempfile.mkdtemp()
    os.symlink(path, os.path.join(d, path.name))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=path.name)
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=path.name, dtype=torch.float32)
    hf = hf.to(device).eval()
    prompts = _greedy_test().encode_prompts(tok)
    seqs, ref = [], []
    with torch.inference_mode():
        for ids in prompts[:num_prompts]:
            x = torch.tensor([ids], device=device)
            out = hf.generate(
                x,
                max_new_tokens=num_tokens,
                min_new_tokens=num_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            lp = torch.log_softmax(hf(out).logits[0].float(), -1)  # row i predicts i + 1
            for k in range(num_tokens):
                n = len(ids) + k
                seqs.append(out[0, :n].tolist())
                ref.append(lp[n - 1].cpu())
    return seqs, ref


def measure(seqs, ref, device: str, **kwargs) -> dict:
    from tessera import LLM, SamplingParams

    llm = LLM(
        "smollm2-135m-instruct",
        device=device,
        gpu_memory_utilization=0.3,
        show_progress=False,
        **kwargs,
    )
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=20, ignore_eos=True)
    outs = llm.generate(seqs, params, use_tqdm=False)
    errors, flip_gaps = [], []
    for o, r in zip(outs, ref, strict=True):
        top = dict(o.outputs[0].logprobs[0].top)
        errors.append(max(abs(v - r[t].item()) for t, v in top.items()))
        ours, theirs = o.outputs[0].token_ids[0], int(r.argmax())
        if ours != theirs:
            flip_gaps.append(float(r[theirs] - r[ours]))
    del llm
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    e = torch.tensor(errors)
    return {
        "positions": len(errors),
        "max_err": e.max().item(),
        "p99_err": e.quantile(0.99).item(),
        "median_err": e.median().item(),
        "argmax_flips": len(flip_gaps),
        "largest_flip_gaps": sorted(flip_gaps)[-5:],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    seqs, ref = reference(device, 32 if cuda else 3, 10 if cuda else 2)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "paths": {}}
    for name, kwargs in PATHS.items():
        if not cuda and name != "float32 torch":
            continue
        result["paths"][name] = measure(seqs, ref, device, **kwargs)
        print(name, result["paths"][name], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
