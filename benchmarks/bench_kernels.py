"""Attention kernels against the device's own ceilings, measured in the same process.

Ceilings first: device-to-device copy bandwidth (a large ``copy_``, bytes read plus
bytes written) and the bf16 matmul rate (8192^3 through cuBLAS). Then:

- paged decode attention (``kernels.paged_decode.paged_decode_attention``) for
  batch 1..256 and context 512..32k: KV bytes read per second over the copy bandwidth,
  beside torch ``scaled_dot_product_attention`` on the same K/V laid out contiguously
  (no block table); combinations that do not fit in memory are skipped;
- prefill attention (``paged_prefill_attention``, one fresh causal prompt) at 1k, 2k
  and 4k tokens: TFLOP/s over the matmul rate, beside causal SDPA.

Shapes are Llama-3-8B's attention (32 query heads, 8 KV heads, head size 128), bf16,
block size 16, block tables shuffled over the pool. Kernels are timed as CUDA-graph
replays (no host launch overhead, as the executor runs them) over enough copies of the
inputs that no call finds its K/V in L2; times are medians of CUDA-event timings.

    python benchmarks/bench_kernels.py --json benchmarks/results/kernels_h100.json
    python benchmarks/bench_kernels.py --dry-run   # CPU: tiny shapes under TRITON_INTERPRET=1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE, BLOCK_SIZE = 32, 8, 128, 16
DECODE_BATCHES = (1, 4, 16, 64, 256)
DECODE_CONTEXTS = (512, 2048, 8192, 32768)
PREFILL_TOKENS = (1024, 2048, 4096)


class Timer:
    """Median seconds per call of ``fn``.

    On a GPU, ``calls`` calls of ``fn`` are captured in one CUDA graph and the graph's
    replays are timed with CUDA events: host launch overhead stays out of the number
    (the executor replays graphs too). ``fn`` rotates over enough copies of its inputs
    that one replay touches several times the L2, so no call finds its data in cache.
    On the CPU (dry runs, where only the logic matters) it is a ``perf_counter`` loop.
    """

    def __init__(self, device: torch.device, reps: int, warmup: int) -> None:
        self.device, self.reps, self.warmup = device, reps, warmup
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object], calls: int = 1, graph: bool = True) -> float:
        for _ in range(max(self.warmup, calls)):  # compile, and visit every input copy
            fn()
        if not self.cuda:
            t0 = time.perf_counter()
            for _ in range(self.reps * calls):
                fn()
            return (time.perf_counter() - t0) / (self.reps * calls)
        if graph:
            g = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.cuda.graph(g, stream=stream):
                for _ in range(calls):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            run = g.replay
        else:
            def run() -> None:
                for _ in range(calls):
                    fn()
        run()
        times = []
        for _ in range(self.reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / calls)
        return statistics.median(times)


def copies_for(nbytes: int, device: torch.device) -> int:
    """Input copies so that one pass over them is at least 4x the L2 (1 on the CPU)."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(1, -(-4 * l2 // max(nbytes, 1)))


class Rotation:
    """Calls ``fn(*inputs[i])`` for i = 0, 1, ... cyclically."""

    def __init__(self, fn: Callable[..., object], inputs: list[tuple]) -> None:
        self.fn, self.inputs, self.i = fn, inputs, 0

    def __call__(self) -> None:
        self.fn(*self.inputs[self.i])
        self.i = (self.i + 1) % len(self.inputs)


def copy_bandwidth(timer: Timer, nbytes: int) -> float:
    """Bytes read plus bytes written per second by ``dst.copy_(src)``."""
    src = torch.randn(nbytes // 2, device=timer.device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    seconds = timer(lambda: dst.copy_(src), graph=False)
    return 2 * src.numel() * src.element_size() / seconds


def matmul_rate(timer: Timer, n: int) -> float:
    """bf16 FLOP/s of an n x n x n product on random data."""
    a = torch.randn(n, n, device=timer.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=timer.device, dtype=torch.bfloat16)
    seconds = timer(lambda: a @ b, graph=False)
    return 2 * n**3 / seconds


def shuffled_pool(num_seqs: int, ctx: int, device, dtype, gen):
    """K/V caches holding ``num_seqs`` sequences of ``ctx`` tokens in shuffled blocks."""
    per_seq = -(-ctx // BLOCK_SIZE)
    num_blocks = num_seqs * per_seq
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)
    k_cache = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    v_cache = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    perm = torch.randperm(num_blocks, device=device, generator=gen).to(torch.int32)
    return k_cache, v_cache, perm.view(num_seqs, per_seq)


def contiguous_kv(cache: torch.Tensor, table: torch.Tensor, ctx: int) -> torch.Tensor:
    """[S, H_kv, ctx, D]: the paged K or V of each sequence, gathered for SDPA."""
    rows = cache[table.long()]  # [S, W, B, H_kv, D]
    rows = rows.flatten(1, 2)[:, :ctx]  # [S, ctx, H_kv, D]
    return rows.transpose(1, 2).contiguous()


def bench_decode(timer: Timer, batch: int, ctx: int, dtype, gen) -> dict:
    from tessera.kernels.paged_decode import paged_decode_attention

    device = timer.device
    kv_bytes = 2 * batch * ctx * NUM_KV_HEADS * HEAD_SIZE * torch.finfo(dtype).bits // 8
    n = copies_for(kv_bytes, device)
    scale = HEAD_SIZE**-0.5
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    paged, dense = [], []
    for _ in range(n):
        k_cache, v_cache, table = shuffled_pool(batch, ctx, device, dtype, gen)
        q = torch.randn(batch, NUM_HEADS, HEAD_SIZE, device=device, dtype=dtype, generator=gen)
        paged.append((q, k_cache, v_cache, table, torch.empty_like(q)))
        dense.append((q.unsqueeze(2), contiguous_kv(k_cache, table, ctx),
                      contiguous_kv(v_cache, table, ctx)))

    def run_paged(q, k_cache, v_cache, table, out) -> None:
        paged_decode_attention(q, k_cache, v_cache, table, lens, scale, out=out)

    def run_sdpa(q4, k, v) -> None:  # q4 [B, H, 1, D], k/v [B, H_kv, ctx, D]
        F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)

    row = {"batch": batch, "context": ctx, "kv_bytes": kv_bytes, "copies": n}
    row["paged_s"] = timer(Rotation(run_paged, paged), calls=max(n, 4))
    row["paged_gbps"] = kv_bytes / row["paged_s"] / 1e9
    row["sdpa_s"] = timer(Rotation(run_sdpa, dense), calls=max(n, 4))
    row["sdpa_gbps"] = kv_bytes / row["sdpa_s"] / 1e9
    return row


def bench_prefill(timer: Timer, tokens: int, dtype, gen) -> dict:
    from tessera.kernels.paged_prefill import paged_prefill_attention

    device = timer.device
    k_cache, v_cache, table = shuffled_pool(1, tokens, device, dtype, gen)
    q = torch.randn(tokens, NUM_HEADS, HEAD_SIZE, device=device, dtype=dtype, generator=gen)
    qsl = torch.tensor([0, tokens], dtype=torch.int32, device=device)
    lens = torch.tensor([tokens], dtype=torch.int32, device=device)
    out = torch.empty_like(q)
    scale = HEAD_SIZE**-0.5
    # Causal: query i meets i + 1 keys; two matmuls of 2 * D FLOPs per (query, key, head).
    flops = 4 * HEAD_SIZE * NUM_HEADS * tokens * (tokens + 1) // 2

    def paged() -> None:
        paged_prefill_attention(q, k_cache, v_cache, table, qsl, lens, scale,
                                max_query_len=tokens, out=out)

    row = {"tokens": tokens, "flops": flops}
    row["paged_s"] = timer(paged, calls=4)  # compute-bound: L2 reuse is immaterial
    row["paged_tflops"] = flops / row["paged_s"] / 1e12
    q4 = q.transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
    k = contiguous_kv(k_cache, table, tokens)
    v = contiguous_kv(v_cache, table, tokens)

    def sdpa() -> None:
        F.scaled_dot_product_attention(q4, k, v, is_causal=True, scale=scale, enable_gqa=True)

    row["sdpa_s"] = timer(sdpa, calls=4)
    row["sdpa_tflops"] = flops / row["sdpa_s"] / 1e12
    return row


def bench_mixed(timer: Timer, decodes: int, ctx: int, chunk: int, dtype, gen) -> dict:
    """One step of ``decodes`` decode rows and one prefill chunk, all at ``ctx`` tokens:
    the whole step through the prefill kernel, against decode kernel + prefill kernel."""
    from tessera.kernels.paged_decode import paged_decode_attention
    from tessera.kernels.paged_prefill import paged_prefill_attention

    device = timer.device
    num_seqs = decodes + 1
    k_cache, v_cache, table = shuffled_pool(num_seqs, ctx, device, dtype, gen)
    q_lens = [1] * decodes + [chunk]
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32,
                       device=device)
    lens = torch.full((num_seqs,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(decodes + chunk, NUM_HEADS, HEAD_SIZE, device=device, dtype=dtype,
                    generator=gen)
    out = torch.empty_like(q)
    scale = HEAD_SIZE**-0.5
    chunk_qsl = torch.tensor([0, chunk], dtype=torch.int32, device=device)

    def unified() -> None:
        paged_prefill_attention(q, k_cache, v_cache, table, qsl, lens, scale,
                                max_query_len=chunk, out=out)

    def split() -> None:
        paged_decode_attention(q[:decodes], k_cache, v_cache, table[:decodes], lens[:decodes],
                               scale, out=out[:decodes])
        paged_prefill_attention(q[decodes:], k_cache, v_cache, table[decodes:], chunk_qsl,
                                lens[decodes:], scale, max_query_len=chunk, out=out[decodes:])

    return {"decodes": decodes, "context": ctx, "chunk": chunk,
            "prefill_kernel_s": timer(unified, calls=4),
            "decode_plus_prefill_s": timer(split, calls=4)}


def fits(device: torch.device, nbytes: int) -> bool:
    """Room for ``nbytes`` with a quarter of the free memory to spare."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= 0.75 * free


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.dry_run:
        raise SystemExit("no CUDA device: use --dry-run to check the script on the CPU")
    dtype = torch.bfloat16
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    timer = Timer(device, reps=args.reps, warmup=args.warmup)
    dry = args.dry_run
    result: dict = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "host": platform.node(),
        "torch": torch.__version__,
        "shape": {"heads": NUM_HEADS, "kv_heads": NUM_KV_HEADS, "head_size": HEAD_SIZE,
                  "block_size": BLOCK_SIZE, "dtype": str(dtype)},
        "dry_run": dry,
    }
    result["copy_gbps"] = copy_bandwidth(timer, (1 << 20) if dry else (2 << 30)) / 1e9
    result["matmul_tflops"] = matmul_rate(timer, 256 if dry else 8192) / 1e12

    decode = []
    for batch in args.batches:
        for ctx in args.contexts:
            kv_bytes = 2 * batch * ctx * NUM_KV_HEADS * HEAD_SIZE * 2
            # The paged pool, SDPA's contiguous copy and one gather in flight: 2.5x.
            if not fits(device, 3 * kv_bytes):
                decode.append({"batch": batch, "context": ctx, "skipped": "memory"})
                continue
            row = bench_decode(timer, batch, ctx, dtype, gen)
            row["paged_vs_copy"] = row["paged_gbps"] / result["copy_gbps"]
            row["sdpa_vs_copy"] = row["sdpa_gbps"] / result["copy_gbps"]
            decode.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result["decode"] = decode

    prefill = []
    for tokens in args.prefill_tokens:
        row = bench_prefill(timer, tokens, dtype, gen)
        row["paged_vs_matmul"] = row["paged_tflops"] / result["matmul_tflops"]
        row["sdpa_vs_matmul"] = row["sdpa_tflops"] / result["matmul_tflops"]
        prefill.append(row)
    result["prefill"] = prefill
    result["mixed"] = [bench_mixed(timer, *((3, 48, 16) if dry else (63, 2048, 512)), dtype, gen)]
    return result


def print_tables(result: dict) -> None:
    print(f"\n{result['device']}: copy {result['copy_gbps']:.0f} GB/s (read + write), "
          f"bf16 matmul {result['matmul_tflops']:.0f} TFLOP/s")
    print("\ndecode  batch  context   paged GB/s  /copy   sdpa GB/s  /copy   paged us")
    for r in result["decode"]:
        if "skipped" in r:
            print(f"        {r['batch']:5d}  {r['context']:7d}   skipped ({r['skipped']})")
            continue
        print(f"        {r['batch']:5d}  {r['context']:7d}   {r['paged_gbps']:10.0f}  "
              f"{r['paged_vs_copy']:5.2f}  {r['sdpa_gbps']:10.0f}  {r['sdpa_vs_copy']:5.2f}  "
              f"{r['paged_s'] * 1e6:9.1f}")
    print("\nprefill tokens   paged TFLOP/s  /matmul   sdpa TFLOP/s  /matmul   paged us")
    for r in result["prefill"]:
        print(f"        {r['tokens']:6d}   {r['paged_tflops']:13.1f}  {r['paged_vs_matmul']:7.2f}  "
              f"{r['sdpa_tflops']:13.1f}  {r['sdpa_vs_matmul']:7.2f}  {r['paged_s'] * 1e6:9.1f}")


    print("\nmixed step: decodes  context  chunk   one prefill launch us   decode + prefill us")
    for r in result["mixed"]:
        print(f"            {r['decodes']:7d}  {r['context']:7d}  {r['chunk']:5d}   "
              f"{r['prefill_kernel_s'] * 1e6:21.1f}   {r['decode_plus_prefill_s'] * 1e6:19.1f}")


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = [r for r in result["decode"] if "skipped" not in r]
    for ctx in sorted({r["context"] for r in rows}):
        sel = [r for r in rows if r["context"] == ctx]
        ax.plot([r["batch"] for r in sel], [r["paged_vs_copy"] for r in sel], "o-",
                label=f"paged, ctx {ctx}")
        ax.plot([r["batch"] for r in sel], [r["sdpa_vs_copy"] for r in sel], "x:",
                label=f"SDPA, ctx {ctx}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("KV read bandwidth / copy bandwidth")
    ax.set_title(f"decode attention, {result['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--json", default=None,
                   help="write the result here as JSON (default benchmarks/results/kernels.json; "
                   "none for --dry-run)")
    p.add_argument("--plot", default=None, help="also save a decode plot here (matplotlib)")
    p.add_argument("--batches", type=int, nargs="+", default=list(DECODE_BATCHES))
    p.add_argument("--contexts", type=int, nargs="+", default=list(DECODE_CONTEXTS))
    p.add_argument("--prefill-tokens", type=int, nargs="+", default=list(PREFILL_TOKENS))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes on the CPU under TRITON_INTERPRET=1: checks the logic only")
    args = p.parse_args()
    if args.dry_run:
        if torch.cuda.is_available():
            raise SystemExit("--dry-run is for machines without a GPU")
        os.environ["TRITON_INTERPRET"] = "1"  # before kernels are imported
        args.batches, args.contexts, args.prefill_tokens = [1, 2], [48], [32]
        args.reps, args.warmup = 1, 0
    elif args.json is None:
        args.json = "benchmarks/results/kernels.json"
    result = run(args)
    print_tables(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nresult: {args.json}")
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
