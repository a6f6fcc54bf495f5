"""GPU offline throughput: Tessera against Hugging Face transformers, same GPU, same run.

Workloads (token-id prompts drawn with a fixed seed, greedy, ``ignore_eos`` so every
request runs to its own ``max_tokens``):

    fixed   N prompts of exactly I tokens, O output tokens each  (--fixed I O N, repeatable)
    mixed   N prompts, inputs 32..1024, outputs 16..512            (--mixed N)

Hugging Face runs first (its model is freed before Tessera allocates its KV pool):
static padded ``generate`` in arrival-order batches of 64, counting only the tokens
each request asked for, and continuous-batching ``generate_batch``. Both may run on a
prefix of the prompts (``--hf-prompts``) where the whole set would not fit the
time; rates (tokens/s) are compared, and the JSON says how many prompts each ran.

The model is random weights of a named shape (``random:llama-3.1-8b``) or a real
one; for random shapes HF builds the same architecture from its config with random
weights (throughput only: the tokens differ).

    python benchmarks/gpu_offline.py --model random:llama-3.1-8b \\
        --fixed 128 128 512 --fixed 1000 1000 512 --mixed 1000 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from datetime import date

import torch
from roofline import measured_rates, shape_of, workload_s  # benchmarks/ on sys.path


def fixed_workload(n: int, inp: int, out: int, vocab: int, seed: int):
    rng = random.Random(seed)
    return [([rng.randrange(100, vocab) for _ in range(inp)], out) for _ in range(n)]


def mixed_workload(n: int, vocab: int, seed: int, inp=(32, 1024), out=(16, 512)):
    # The CPU benchmark's generator: same draws for the same seed.
    from offline import make_workload  # benchmarks/ is sys.path[0] when run as a script

    return make_workload(n, inp, out, vocab, seed)


def hf_model_for(name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from tessera.common.registry import RANDOM_SHAPES, resolve_model

    if name.startswith("random:"):
        mc = RANDOM_SHAPES[name.split(":", 1)[1]]
        cls = Qwen2Config if mc.architecture == "qwen2" else LlamaConfig
        cfg = cls(
            vocab_size=mc.vocab_size,
            hidden_size=mc.hidden_size,
            intermediate_size=mc.intermediate_size,
            num_hidden_layers=mc.num_hidden_layers,
            num_attention_heads=mc.num_attention_heads,
            num_key_value_heads=mc.num_key_value_heads,
            head_dim=mc.head_dim,
            rms_norm_eps=mc.rms_norm_eps,
            rope_theta=mc.rope_theta,
            max_position_embeddings=mc.max_position_embeddings,
            tie_word_embeddings=mc.tie_word_embeddings,
            rope_scaling=mc.rope_scaling,
        )
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        model.generation_config.eos_token_id = None  # random weights: never stop early
        return model.eval()
    src = resolve_model(name)
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
    return model.cuda().eval()


def run_hf_static(model, work, batch_size: int) -> dict:
    useful = 0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, len(work), batch_size):
        batch = work[i : i + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (p, _) in enumerate(batch):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        steps = max(o for _, o in batch)
        model.generate(
            input_ids=ids.cuda(),
            attention_mask=mask.cuda(),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
        )
        useful += sum(o for _, o in batch)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"prompts": len(work), "seconds": dt, "output_tokens": useful, "tok_per_s": useful / dt}


def run_hf_generate_batch(model, work) -> dict:
    from transformers.generation import GenerationConfig

    longest = max(o for _, o in work)
    cfg = GenerationConfig(
        max_new_tokens=longest, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    # generate_batch takes one max_new_tokens; run each distinct output length apart.
    by_len: dict[int, list[list[int]]] = {}
    for p, o in work:
        by_len.setdefault(o, []).append(p)
    produced = 0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for out_len, prompts in by_len.items():
        cfg.max_new_tokens = out_len
        outs = model.generate_batch(inputs=prompts, generation_config=cfg, progress_bar=False)
        produced += sum(min(len(o.generated_tokens), out_len) for o in outs.values())
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {
        "prompts": len(work),
        "seconds": dt,
        "output_tokens": produced,
        "tok_per_s": produced / dt,
    }


def run_tessera(llm, work) -> dict:
    from tessera import SamplingParams

    prompts = [p for p, _ in work]
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for _, o in work]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == sum(o for _, o in work), "every request must run to max_tokens"
    inp = sum(len(p) for p, _ in work)
    return {
        "prompts": len(work),
        "seconds": dt,
        "output_tokens": produced,
        "tok_per_s": produced / dt,
        "total_tok_per_s": (produced + inp) / dt,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="random:llama-3.1-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument(
        "--fixed", type=int, nargs=3, action="append", default=[], metavar=("IN", "OUT", "N")
    )
    ap.add_argument("--mixed", type=int, default=0, metavar="N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto | fp8")
    ap.add_argument(
        "--quantization",
        default="auto",
        help="auto | none | gptq | awq; gptq or awq with random:<shape>: random 4-bit linears",
    )
    ap.add_argument(
        "--hf-prompts",
        type=int,
        default=64,
        help="HF runs this many prompts of each workload (0: skip HF)",
    )
    ap.add_argument("--hf-batch-size", type=int, default=64)
    ap.add_argument(
        "--hf-on",
        nargs="*",
        default=None,
        help="run HF only on workloads whose name contains one of these (default: all)",
    )
    ap.add_argument("--hf-generate-batch", action="store_true")
    ap.add_argument(
        "--sync-too",
        action="store_true",
        help="run each workload again with async scheduling off (same engine, same run)",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    dtype = getattr(torch, args.dtype)

    from tessera.common.registry import RANDOM_SHAPES

    vocab = (
        RANDOM_SHAPES[args.model.split(":", 1)[1]].vocab_size
        if args.model.startswith("random:")
        else 32000
    )
    workloads = {}
    if args.mixed:  # first: the workload the targets care most about
        workloads[f"mixed x{args.mixed}"] = mixed_workload(args.mixed, vocab, args.seed)
    for i, o, n in args.fixed:
        workloads[f"fixed {i}/{o} x{n}"] = fixed_workload(n, i, o, vocab, args.seed)
    result = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "model": args.model,
        "dtype": args.dtype,
        "args": vars(args),
        "workloads": {},
    }
    for name in workloads:
        result["workloads"][name] = {}
    device = torch.device("cuda")
    bw, rate = measured_rates(device)
    result["copy_bandwidth_GBps"], result["matmul_TFLOPs"] = bw / 1e9, rate / 1e12

    if args.hf_prompts:
        hf = hf_model_for(args.model, dtype)
        for name, work in workloads.items():
            if args.hf_on is not None and not any(k in name for k in args.hf_on):
                continue
            sub = work[: args.hf_prompts]
            r = result["workloads"][name]
            r["hf_static"] = run_hf_static(hf, sub, args.hf_batch_size)
            print(name, "hf static", r["hf_static"], flush=True)
            if args.hf_generate_batch:
                try:
                    r["hf_generate_batch"] = run_hf_generate_batch(hf, sub)
                except Exception as e:  # report, keep measuring the rest
                    r["hf_generate_batch"] = {"error": f"{type(e).__name__}: {e}"}
                print(name, "hf generate_batch", r["hf_generate_batch"], flush=True)
        del hf
        gc.collect()
        torch.cuda.empty_cache()

    from tessera import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(
        args.model,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        cuda_graphs=not args.no_cuda_graphs,
        kv_cache_dtype=args.kv_cache_dtype,
        quantization=args.quantization,
        show_progress=False,
    )
    result["tessera_startup_s"] = time.perf_counter() - t0
    result["kv_blocks"] = llm.runner.num_blocks
    from decode_step import kv_bytes_per_token, weight_bytes

    runner = llm.runner
    shape = shape_of(runner.model_config, weight_bytes(runner), kv_bytes_per_token(runner))
    warm = fixed_workload(8, 64, 16, vocab, args.seed + 1)
    llm.generate(
        [p for p, _ in warm],
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
        use_tqdm=False,
    )
    for name, work in workloads.items():
        r = result["workloads"][name]
        # Untimed: this workload's first 64 prompts, 16 tokens each, so that first-use
        # Triton compiles of its prefill tile shapes are not timed (8 s of a 35 s run).
        llm.generate(
            [p for p, _ in work[:64]],
            SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
            use_tqdm=False,
        )
        r["tessera"] = run_tessera(llm, work)
        # The least time an engine with this batch limit and pool could take (roofline.py).
        roof = workload_s(
            shape,
            [(len(p), o) for p, o in work],
            args.max_num_seqs,
            runner.num_blocks * runner.block_size,
            bw,
            rate,
        )
        r["roofline_tok_per_s"] = r["tessera"]["output_tokens"] / roof
        r["vs_roofline"] = r["tessera"]["tok_per_s"] / r["roofline_tok_per_s"]
        print(
            f"{name}: {r['tessera']['tok_per_s']:,.0f} output tok/s, roofline "
            f"{r['roofline_tok_per_s']:,.0f} ({r['vs_roofline']:.2f} of it)",
            flush=True,
        )
        if args.sync_too:  # the same workload with async scheduling off, for the ratio
            llm.engine.pipelined = False
            r["tessera_sync"] = run_tessera(llm, work)
            llm.engine.pipelined = True
            r["async_vs_sync"] = r["tessera"]["tok_per_s"] / r["tessera_sync"]["tok_per_s"]
        for key in ("hf_static", "hf_generate_batch"):
            if key in r and "tok_per_s" in r[key]:
                r[f"speedup_vs_{key}"] = r["tessera"]["tok_per_s"] / r[key]["tok_per_s"]
        print(name, json.dumps(r), flush=True)
        if args.json:  # after every workload, so a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
