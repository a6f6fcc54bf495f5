"""Sweep the tile configurations of the paged attention kernels on a GPU.

Replaces the config functions of ``kernels.paged_decode`` and ``kernels.paged_prefill``
for the duration of each measurement and times decode (KV GB/s) and prefill (TFLOP/s)
at a few shapes, so the defaults there can be chosen from numbers. Same shapes and timer as
``benchmarks/bench_kernels.py``.

    python benchmarks/tune_attention.py --json /tmp/tune.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json

import torch

import benchmarks.bench_kernels as bk  # noqa: E402
from benchmarks.bench_kernels import Timer, shuffled_pool  # noqa: E402
from tessera.kernels import _paged_common as paged  # noqa: E402
from tessera.kernels import paged_decode as dec  # noqa: E402
from tessera.kernels import paged_prefill as pre  # noqa: E402

DECODE_SHAPES = ((64, 2048), (8, 8192), (256, 1024), (1, 32768))
PREFILL_TOKENS = (1024, 4096)


def tune_decode(timer: Timer, gen: torch.Generator) -> list[dict]:
    rows = []
    default = dec._decode_config
    for batch, ctx in DECODE_SHAPES:
        k_cache, v_cache, table = shuffled_pool(batch, ctx, timer.device, torch.bfloat16, gen)
        q = torch.randn(batch, bk.NUM_HEADS, bk.HEAD_SIZE, device=timer.device,
                        dtype=torch.bfloat16)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=timer.device)
        kv_bytes = 2 * k_cache.numel() * k_cache.element_size()
        call = functools.partial(dec.paged_decode_attention, q, k_cache, v_cache, table, lens,
                                 bk.HEAD_SIZE**-0.5)
        for block_n, warps, stages in itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4)):
            dec._decode_config = lambda *_, c=(block_n, warps, stages): c
            try:
                seconds = timer(call)
            except Exception as e:  # out of shared memory / registers: not a candidate
                print(f"decode {batch}x{ctx} {block_n}/{warps}/{stages}: {type(e).__name__}")
                continue
            finally:
                dec._decode_config = default
            rows.append({"batch": batch, "context": ctx, "block_n": block_n, "warps": warps,
                         "stages": stages, "us": seconds * 1e6, "gbps": kv_bytes / seconds / 1e9})
        best = sorted((r for r in rows if r["batch"] == batch and r["context"] == ctx),
                      key=lambda r: r["us"])[:5]
        for r in best:
            print(f"decode B={batch:4d} ctx={ctx:6d}  n={r['block_n']:3d} w={r['warps']} "
                  f"s={r['stages']}  {r['us']:8.1f} us  {r['gbps']:6.0f} GB/s")
        # The split count, at the best tiles: the default heuristic's choice among them.
        top = best[0]
        dec._decode_config = lambda *_, c=(top["block_n"], top["warps"], top["stages"]): c
        chosen = dec.default_num_splits(batch, bk.NUM_KV_HEADS, ctx, top["block_n"],
                                       paged.num_sms(timer.device))
        line = []
        for splits in (1, 2, 4, 8, 16, 32, 64):
            seconds = timer(functools.partial(call, num_splits=splits))
            rows.append({"batch": batch, "context": ctx, **{k: top[k] for k in
                         ("block_n", "warps", "stages")}, "num_splits": splits,
                         "us": seconds * 1e6, "gbps": kv_bytes / seconds / 1e9})
            line.append(f"{splits}{'*' if splits == chosen else ''}:{kv_bytes / seconds / 1e9:.0f}")
        dec._decode_config = default
        print(f"decode B={batch:4d} ctx={ctx:6d}  splits GB/s (* = default {chosen}): "
              + " ".join(line))
        k_cache = v_cache = call = None
        torch.cuda.empty_cache()
    return rows


def tune_prefill(timer: Timer, gen: torch.Generator, token_counts) -> list[dict]:
    rows = []
    default = pre._prefill_config
    for tokens in token_counts:
        k_cache, v_cache, table = shuffled_pool(1, tokens, timer.device, torch.bfloat16, gen)
        q = torch.randn(tokens, bk.NUM_HEADS, bk.HEAD_SIZE, device=timer.device,
                        dtype=torch.bfloat16)
        qsl = torch.tensor([0, tokens], dtype=torch.int32, device=timer.device)
        lens = torch.tensor([tokens], dtype=torch.int32, device=timer.device)
        flops = 4 * bk.HEAD_SIZE * bk.NUM_HEADS * tokens * (tokens + 1) // 2
        call = functools.partial(pre.paged_prefill_attention, q, k_cache, v_cache, table, qsl,
                                 lens, bk.HEAD_SIZE**-0.5, max_query_len=tokens)
        for bm, bn, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8),
                                                       (2, 3, 4)):
            config = pre.PrefillConfig(bm, bn, warps, stages)
            pre._prefill_config = lambda *_, c=config: c
            try:
                seconds = timer(call, calls=4)
            except Exception as e:
                print(f"prefill {tokens} {bm}/{bn}/{warps}/{stages}: {type(e).__name__}")
                continue
            finally:
                pre._prefill_config = default
            rows.append({"tokens": tokens, "block_m": bm, "block_n": bn, "warps": warps,
                         "stages": stages, "us": seconds * 1e6,
                         "tflops": flops / seconds / 1e12})
        best = sorted((r for r in rows if r["tokens"] == tokens), key=lambda r: r["us"])[:6]
        for r in best:
            print(f"prefill T={tokens:5d}  m={r['block_m']:3d} n={r['block_n']:3d} "
                  f"w={r['warps']} s={r['stages']}  {r['us']:8.1f} us  {r['tflops']:6.1f} TFLOP/s")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json", default=None)
    p.add_argument("--only", choices=("decode", "prefill"), default=None)
    p.add_argument("--head-size", type=int, default=bk.HEAD_SIZE)
    p.add_argument("--prefill-tokens", type=int, nargs="+", default=list(PREFILL_TOKENS))
    args = p.parse_args()
    bk.HEAD_SIZE = args.head_size  # shuffled_pool reads it from its module
    timer = Timer(torch.device("cuda"), reps=10, warmup=2)
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    result = {"num_kv_heads": bk.NUM_KV_HEADS, "head_size": bk.HEAD_SIZE}
    if args.only != "prefill":
        result["decode"] = tune_decode(timer, gen)
    if args.only != "decode":
        result["prefill"] = tune_prefill(timer, gen, args.prefill_tokens)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
