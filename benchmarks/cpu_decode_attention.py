"""CPU decode attention: the fused numba kernel against the grouped plain-torch path.

One decode step's attention over every layer of SmolLM2's shape (3 KV heads x 3 query
heads, head size 64, block size 16, 30 layers), block tables scattered over a shuffled
pool, best of 3 per case, both paths in the same process:

    PYTHONPATH=. .venv/bin/python benchmarks/cpu_decode_attention.py
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from tessera.executor import cpu_attention
from tessera.executor.attention import TorchAttentionBackend

BLOCK, H_KV, GROUP, D, LAYERS, POOL = 16, 3, 3, 64, 30, 2800


def step_ms(backend, q, caches, lens, tables) -> float:
    meta = backend.build_metadata([1] * len(lens), lens, tables, BLOCK, torch.device("cpu"))
    backend.forward(q, *caches[0], meta, D**-0.5)  # warm
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for k, v in caches:
            backend.forward(q, k, v, meta, D**-0.5)
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--cases", nargs="+", default=["64:150:768", "32:300:768", "8:400:768"],
        help="BATCH:MIN_CONTEXT:MAX_CONTEXT",
    )  # fmt: skip
    args = ap.parse_args()
    rng = random.Random(0)
    torch.manual_seed(0)
    caches = [
        (torch.randn(POOL, BLOCK, H_KV, D), torch.randn(POOL, BLOCK, H_KV, D))
        for _ in range(LAYERS)
    ]
    cpu_attention.warm_up()
    print(f"torch threads {torch.get_num_threads()}")
    for case in args.cases:
        batch, lo, hi = map(int, case.split(":"))
        lens = [rng.randint(lo, hi) for _ in range(batch)]
        perm = list(range(POOL))
        rng.shuffle(perm)
        tables, at = [], 0
        for n in lens:
            blocks = -(-n // BLOCK)
            tables.append(perm[at : at + blocks])
            at += blocks
        q = torch.randn(batch, H_KV * GROUP, D)
        grouped = step_ms(TorchAttentionBackend(), q, caches, lens, tables)
        fused = step_ms(TorchAttentionBackend(fused_decode=True), q, caches, lens, tables)
        print(
            f"{batch} decodes of {lo}..{hi} tokens: torch grouped {grouped:.1f} ms, "
            f"numba fused {fused:.1f} ms per step ({grouped / fused:.2f}x)"
        )


if __name__ == "__main__":
    main()
