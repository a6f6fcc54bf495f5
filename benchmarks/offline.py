"""Offline throughput: Tessera's continuous batching against Hugging Face static batching.

Same prompts, same run, same device. The workload is mixed-length token-id prompts
drawn with a fixed seed, decoded greedily with ``ignore_eos`` so every request runs to
its own ``max_tokens``. Hugging Face ``generate`` runs the prompts in arrival order in
left-padded batches; each batch decodes until its longest request is done, and only
the tokens each request asked for are counted as useful.

    python benchmarks/offline.py                       # default model on the CPU
    python benchmarks/offline.py --num-prompts 64 --input-len 16 512 --output-len 16 256
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from datetime import date

import torch


def make_workload(
    n: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab: int, seed: int
) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    work = []
    for _ in range(n):
        length = rng.randint(*input_len)
        # Skip the first ids: special tokens in most vocabularies.
        work.append(([rng.randrange(100, vocab) for _ in range(length)], rng.randint(*output_len)))
    return work


def run_tessera(args, work) -> dict:
    from tessera import LLM, SamplingParams

    llm = LLM(
        args.model,
        device=args.device,
        dtype=args.dtype,
        show_progress=False,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    prompts = [p for p, _ in work]
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for _, o in work]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == sum(o for _, o in work), "every request must run to max_tokens"
    return {"seconds": elapsed, "output_tokens": produced, "tok_per_s": produced / elapsed}


def run_hf_static(args, work, model) -> dict:
    pad = 0
    useful = 0
    t0 = time.perf_counter()
    for i in range(0, len(work), args.hf_batch_size):
        batch = work[i : i + args.hf_batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (p, _) in enumerate(batch):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        steps = max(o for _, o in batch)
        with torch.inference_mode():
            model.generate(
                input_ids=ids.to(model.device),
                attention_mask=mask.to(model.device),
                max_new_tokens=steps,
                min_new_tokens=steps,
                do_sample=False,
                pad_token_id=pad,
            )
        useful += sum(o for _, o in batch)
    elapsed = time.perf_counter() - t0
    return {"seconds": elapsed, "output_tokens": useful, "tok_per_s": useful / elapsed}


def load_hf_model(args):
    from transformers import AutoModelForCausalLM

    from tessera.common.registry import resolve_model

    src = resolve_model(args.model)
    dtype = torch.float32 if args.dtype in ("auto", "float32") else getattr(torch, args.dtype)
    if src.kind == "gguf":
        import os
        import tempfile

        d = tempfile.mkdtemp()
        os.symlink(src.path, os.path.join(d, os.path.basename(src.path)))
        model = AutoModelForCausalLM.from_pretrained(
            d, gguf_file=os.path.basename(src.path), dtype=dtype
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype)
    device = "cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    return model.to(device).eval()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, nargs=2, default=(16, 512))
    p.add_argument("--output-len", type=int, nargs=2, default=(16, 256))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument(
        "--hf-batch-size",
        type=int,
        nargs="+",
        default=[16, 64],
        help="static batch sizes to run Hugging Face at (each one is reported)",
    )
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of (Tessera, HF at each batch size), alternating which side goes "
        "first; the ratio is of medians (a shared VM drifts by 10-20%% between runs)",
    )
    p.add_argument("--json", default=None, help="write the result here as JSON")
    args = p.parse_args()
    torch.set_grad_enabled(False)

    hf_model = None if args.skip_hf else load_hf_model(args)
    vocab = hf_model.config.vocab_size if hf_model is not None else 32000
    work = make_workload(
        args.num_prompts, tuple(args.input_len), tuple(args.output_len), vocab, args.seed
    )
    result = {
        "date": date.today().isoformat(),
        "host": platform.node(),
        "threads": torch.get_num_threads(),
        "model": args.model,
        "num_prompts": args.num_prompts,
        "input_len": list(args.input_len),
        "output_len": list(args.output_len),
        "seed": args.seed,
    }
    tessera_runs: list[dict] = []
    hf_runs: dict[int, list[dict]] = {size: [] for size in args.hf_batch_size}

    def hf_round() -> None:
        for size in hf_runs if hf_model is not None else ():
            one = argparse.Namespace(**{**vars(args), "hf_batch_size": size})
            hf_runs[size].append(run_hf_static(one, work, hf_model))

    for i in range(args.repeat):
        if i % 2:
            hf_round()
        tessera_runs.append(run_tessera(args, work))
        if not i % 2:
            hf_round()
    tessera_rate = statistics.median(r["tok_per_s"] for r in tessera_runs)
    result["tessera"] = {
        "output_tokens": tessera_runs[0]["output_tokens"],
        "seconds": statistics.median(r["seconds"] for r in tessera_runs),
        "tok_per_s": tessera_rate,
    }
    result["tessera_runs"] = [r["tok_per_s"] for r in tessera_runs]
    if hf_model is not None:
        result["hf_static"] = []
        for size, runs in hf_runs.items():
            rate = statistics.median(r["tok_per_s"] for r in runs)
            result["hf_static"].append(
                {
                    "batch_size": size,
                    "tok_per_s": rate,
                    "runs": [r["tok_per_s"] for r in runs],
                    "tessera_speedup": tessera_rate / rate,
                }
            )
        # against Hugging Face at its best batch size
        result["speedup"] = min(r["tessera_speedup"] for r in result["hf_static"])
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
