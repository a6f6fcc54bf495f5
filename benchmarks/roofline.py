"""Rooflines of a decode step and of a whole offline workload, from the model's shape.

A decode step of ``n`` sequences whose contexts sum to ``C`` tokens runs its linears and
its attention one kernel after the other, so it cannot take less than

    max(weight_bytes / copy_bandwidth, n * linear_flops_per_token / matmul_rate)
  + max(C * kv_bytes_per_token / copy_bandwidth, C * attention_flops_per_pair / matmul_rate)

each part reading its bytes once at the measured copy bandwidth or doing its
multiply-adds at the measured bf16 matmul rate, whichever is longer. At batch 256 on an
8B model the linears are bound by FLOPs (reading the weights takes less time than the
matmuls) while attention is bound by its K/V reads, so neither a bytes-only roofline nor
one maximum over the whole step is a time any engine could reach. A prefill token costs its linear
FLOPs plus its causal attention FLOPs at the matmul rate.

A workload's roofline replays its requests through an ideal scheduler: FCFS admission
while fewer than ``max_num_seqs`` run and the pool holds every running sequence's whole
context, each running sequence decoding one token per step. Prefill is FLOPs at the
matmul rate, and an ideal engine runs it inside decode steps whose linears wait on the
weight reads: the compute those steps leave idle (``weight_bytes / bw - n * linear
FLOPs / rate`` a step) absorbs for free the prefill of the requests admitted just
before them (until the next admission), and only the rest adds time: a prompt cannot
be computed before the pool has room for it, nor its decoding start before its prefill
is done. That is a time no engine with
this batch limit and pool could beat; ``throughput / roofline throughput`` is the
fraction reached.

Pure Python: the measured rates come from the caller (``measured_rates`` here, or
``bench_kernels.copy_bandwidth`` and ``matmul_rate``, which it calls).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class Shape:
    """What a roofline needs of a model: bytes and FLOPs per token."""

    weight_bytes: int  # read once per step (embeddings excluded: only gathered rows)
    kv_bytes_per_token: int  # K and V of every layer for one token
    linear_flops_per_token: int  # 2 x multiply-adds of every linear, LM head included
    attention_flops_per_pair: int  # 2 x (QK^T + PV) multiply-adds of one query-key pair


def shape_of(mc, weight_bytes: int, kv_bytes_per_token: int, tp: int = 1) -> Shape:
    """``mc``: a ``ModelConfig``. FLOPs are per rank with tensor parallel ``tp``."""
    h, hd, layers = mc.hidden_size, mc.head_dim, mc.num_hidden_layers
    q, kv = mc.num_attention_heads * hd, mc.num_key_value_heads * hd
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * mc.intermediate_size
    linear = 2 * (layers * per_layer + h * mc.vocab_size)
    pair = 2 * 2 * mc.num_attention_heads * hd * layers
    return Shape(weight_bytes, kv_bytes_per_token, linear // tp, pair // tp)


def decode_step_s(shape: Shape, n: int, context_sum: int, bw: float, rate: float) -> float:
    """Least time of one decode step of ``n`` sequences with ``context_sum`` cached tokens."""
    linears = max(shape.weight_bytes / bw, n * shape.linear_flops_per_token / rate)
    attention = max(
        context_sum * shape.kv_bytes_per_token / bw,
        context_sum * shape.attention_flops_per_pair / rate,
    )
    return linears + attention


def prefill_s(shape: Shape, prompt_len: int, rate: float) -> float:
    """Least time of a prompt's prefill: causal, so token i attends to i + 1 keys."""
    pairs = prompt_len * (prompt_len + 1) // 2
    return (
        prompt_len * shape.linear_flops_per_token + pairs * shape.attention_flops_per_pair
    ) / rate


def workload_s(
    shape: Shape,
    requests: list[tuple[int, int]],  # (prompt tokens, output tokens), arrival order
    max_num_seqs: int,
    pool_tokens: int,
    bw: float,
    rate: float,
) -> float:
    """Least time of an offline workload under an ideal scheduler (see the module doc)."""
    waiting = deque(requests)
    running: list[list[int]] = []  # [context, tokens left]
    total = 0.0
    backlog = 0.0  # seconds of prefill (at the matmul rate) of admitted requests not yet run
    held = 0  # tokens of context the running sequences hold
    while waiting or running:
        while waiting and len(running) < max_num_seqs:
            inp, out = waiting[0]
            if running and held + inp + out > pool_tokens:
                break  # the whole context must fit; a lone request always runs
            waiting.popleft()
            backlog += prefill_s(shape, inp, rate)
            # Prefill makes the first output token; the rest are decode steps.
            if out > 1:
                running.append([inp + 1, out - 1])
                held += inp + out
        if not running:
            continue
        context_sum = sum(c for c, _ in running)
        # Steps until the next sequence finishes: the set is fixed until then.
        k = min(left for _, left in running)
        n = len(running)
        for i in range(k):  # contexts grow by n tokens a step
            total += decode_step_s(shape, n, context_sum + i * n, bw, rate)
        # Compute these steps leave idle while their linears wait on the weights.
        idle = k * max(0.0, shape.weight_bytes / bw - n * shape.linear_flops_per_token / rate)
        total += backlog - min(backlog, idle)  # the rest runs before these steps
        backlog = 0.0
        keep = []
        for r in running:
            r[0] += k
            r[1] -= k
            if r[1]:
                keep.append(r)
            else:
                held -= r[0]
        running = keep
    return total + backlog


def measured_rates(device) -> tuple[float, float]:
    """(copy bytes/s, bf16 matmul FLOP/s) on ``device``: bench_kernels' measurements
    (2 GiB copied, 8192^3 multiplied, median of 10 timed runs)."""
    from bench_kernels import Timer, copy_bandwidth, matmul_rate  # benchmarks/ on sys.path

    timer = Timer(device, reps=10, warmup=3)
    return copy_bandwidth(timer, 2 << 30), matmul_rate(timer, 8192)
