"""Paged decode attention for the CPU, reading K/V blocks in place (numba).

The plain-torch path (``executor.attention``) must copy each sequence's blocks out of
the pool before ``scaled_dot_product_attention`` can read them, so every K/V byte is
read, written and read again. This kernel walks the block table instead, as the
Triton decode kernel does on the GPU: one work item per (sequence, KV head), all G
query heads of that KV head together, an online softmax over the blocks. On the
2-core development VM it takes a decode step of 64 sequences x 150..768 tokens from
~225 ms to ~130 ms of attention (30 layers of SmolLM2).

numba compiles it on first use (a few seconds; cached on disk after that) and it runs
only on float32 pools; the torch path is the fallback wherever numba is missing.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

try:  # numba is optional: without it the torch path does all the work
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is not installed
    numba = None

# numba's fallback "workqueue" threading layer aborts the process when two threads
# launch parallel kernels at once (several engines in one process, as in tests).
_launch_lock = threading.Lock()
_kernel = None


def available() -> bool:
    return numba is not None


def _build():
    njit, prange = numba.njit, numba.prange

    # fastmath lets the dot products and accumulations vectorise. It also lets LLVM
    # assume no infinities, so the running max starts at -1e30, not -inf: every value
    # stays finite for finite inputs.
    @njit(parallel=True, fastmath=True, boundscheck=False, error_model="numpy", cache=True)
    def paged_decode(q, k_pool, v_pool, rows, tables, lens, scale, out):  # pragma: no cover
        # q, out: [T, H, D]; k_pool, v_pool: [N, B, H_kv, D]; rows, lens: [n];
        # tables: [n, max_blocks]. Row rows[i] of q attends to the first lens[i] tokens
        # of the blocks tables[i]; query head j reads KV head j // G.
        n = rows.shape[0]
        num_heads, d_head = q.shape[1], q.shape[2]
        bs, h_kv = k_pool.shape[1], k_pool.shape[2]
        g_size = num_heads // h_kv
        for w in prange(n * h_kv):
            i = w // h_kv
            h = w - i * h_kv
            r = rows[i]
            length = lens[i]
            m = np.full(g_size, -1e30, dtype=np.float32)  # exp(-1e30 - x) == 0
            total = np.zeros(g_size, dtype=np.float32)
            acc = np.zeros((g_size, d_head), dtype=np.float32)
            s = np.empty((g_size, bs), dtype=np.float32)
            qs = np.empty((g_size, d_head), dtype=np.float32)
            for g in range(g_size):
                for d in range(d_head):
                    qs[g, d] = q[r, h * g_size + g, d] * scale
            for j in range((length + bs - 1) // bs):
                blk = tables[i, j]
                te = min(bs, length - j * bs)
                for t in range(te):
                    krow = k_pool[blk, t, h]
                    for g in range(g_size):
                        qg = qs[g]
                        a = np.float32(0.0)
                        for d in range(d_head):
                            a += qg[d] * krow[d]
                        s[g, t] = a
                for g in range(g_size):
                    mx = m[g]
                    for t in range(te):
                        mx = max(mx, s[g, t])
                    alpha = math.exp(m[g] - mx)
                    m[g] = mx
                    tot = total[g] * alpha
                    for t in range(te):
                        e = math.exp(s[g, t] - mx)
                        s[g, t] = e
                        tot += e
                    total[g] = tot
                    ag = acc[g]
                    for d in range(d_head):
                        ag[d] *= alpha
                for t in range(te):
                    vrow = v_pool[blk, t, h]
                    for g in range(g_size):
                        p = s[g, t]
                        ag = acc[g]
                        for d in range(d_head):
                            ag[d] += p * vrow[d]
            for g in range(g_size):
                inv = np.float32(1.0) / total[g]
                for d in range(d_head):
                    out[r, h * g_size + g, d] = acc[g, d] * inv

    return paged_decode


def paged_decode(
    q: torch.Tensor,  # [T, H, D] float32
    k_cache: torch.Tensor,  # [N, B, H_kv, D] float32
    v_cache: torch.Tensor,
    rows: np.ndarray,  # [n] int64: rows of q (and out) that decode
    tables: np.ndarray,  # [n, max_blocks] int32, padded with any valid block id
    lens: np.ndarray,  # [n] int32: context lengths, >= 1
    scale: float,
    out: torch.Tensor,  # [T, H, D] float32: rows ``rows`` are written, others untouched
) -> None:
    global _kernel
    if numba is None:
        raise RuntimeError("the fused CPU decode kernel needs numba (pip install numba)")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 CPU tensor")
    if q.shape != out.shape or k_cache.shape != v_cache.shape:
        raise ValueError(f"shape mismatch: q {q.shape}, out {out.shape}, k/v {k_cache.shape}")
    if q.shape[1] % k_cache.shape[2] or q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"q heads {tuple(q.shape[1:])} do not fit KV heads {k_cache.shape}")
    if not (rows.shape[0] == tables.shape[0] == lens.shape[0]):
        raise ValueError("rows, tables and lens must have one entry per decode")
    if (rows.dtype, tables.dtype, lens.dtype) != (np.int64, np.int32, np.int32) or tables.ndim != 2:
        raise ValueError("rows must be int64, tables a 2-D int32 array, lens int32")
    # The kernel runs without bounds checks: an index out of range would read (or, for
    # rows, write) outside the tensors, so check every index here (microseconds).
    if rows.size:
        if not (0 <= rows.min() and rows.max() < q.shape[0]):
            raise ValueError(f"decode rows outside the batch of {q.shape[0]} tokens")
        if not (1 <= lens.min() and lens.max() <= tables.shape[1] * k_cache.shape[1]):
            raise ValueError("context lengths must be >= 1 and fit the block tables")
        if not (0 <= tables.min() and tables.max() < k_cache.shape[0]):
            raise ValueError(f"block ids outside the pool of {k_cache.shape[0]} blocks")
    with _launch_lock:
        if _kernel is None:
            _kernel = _build()
        # Thread-local in numba, so set by whichever thread launches; torch's intra-op
        # thread count is the one the user configured.
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        _kernel(
            q.numpy(),
            k_cache.numpy(),
            v_cache.numpy(),
            rows,
            tables,
            lens,
            np.float32(scale),
            out.numpy(),
        )


def warm_up() -> None:
    """Compile (or load from numba's disk cache) before the first request needs it."""
    q = torch.zeros(1, 1, 8)
    kv = torch.zeros(1, 1, 1, 8)
    rows, table, lens = np.zeros(1, np.int64), np.zeros((1, 1), np.int32), np.ones(1, np.int32)
    paged_decode(q, kv, kv, rows, table, lens, 1.0, q.clone())
