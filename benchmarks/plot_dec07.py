"""Plots of the 2026-12-07 H100 runs in benchmarks/results/ (matplotlib, not a dependency).

python benchmarks/plot_dec07.py   # writes benchmarks/plots/{w4a16_rows,prefill,latency}_h100.png
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent


def w4a16_plot() -> None:
    """4-bit GEMM speed over bf16 against the row count, per 8B layer shape."""
    d = json.loads((HERE / "results/w4a16_tc_h100.json").read_text())
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for shape in ("qkv", "o", "gate_up", "down"):
        pts = sorted((g["M"], g["auto_speedup"]) for g in d["gemm"] if g["shape"] == shape)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=shape)
    ax.axhline(1.0, color="grey", lw=1, ls="--")
    _finish(fig, ax, "rows (tokens in the step)", "speed over bf16 x @ W",
            "W4A16 (GPTQ, group 128) on the 8B layer shapes, H100, 2026-12-07",
            "w4a16_rows_h100.png")  # fmt: skip


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, png: str) -> None:
    """A log2 x axis, labels, title and legend; saved under plots/."""
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "plots" / png, dpi=110)


def prefill_plot() -> None:
    """Prefill TFLOP/s per prompt length: first kernel, new default, flash SDPA."""
    d = json.loads((HERE / "results/tune_prefill_h100_dec07.json").read_text())["prefill"]
    lengths = [x["tokens"] for x in d["lengths"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lengths, [x["sdpa_tflops"] for x in d["lengths"]], "s--", label="torch flash SDPA")
    first = {c["label"]: c for c in d["candidates"]}
    old = [
        max(
            m["tflops"]
            for c in (first["128x64 w4 s3"], first["64x64 w4 s2"])
            for m in c["lengths"]
            if m["tokens"] == t
        )
        for t in lengths
    ]
    ax.plot(lengths, old, "o-", label="first kernel (its tuned tiles)")
    new = [
        next(m for m in first[label]["lengths"] if m["tokens"] == t)["tflops"]
        for label, t in zip(
            (
                "128x64 w8 s3 +unmasked +page +ahead",
                "128x128 w8 s3 +unmasked +page +ahead",
                "128x128 w8 s3 +unmasked +page +ahead",
            ),
            lengths,
            strict=True,
        )
    ]
    ax.plot(lengths, new, "o-", label="table a tile ahead (default now)")
    ax.axhline(0.75 * d["matmul_tflops"], color="grey", ls=":", label="target: 0.75 x matmul")
    _finish(fig, ax, "prompt tokens (one causal prompt, paged K/V)", "TFLOP/s",
            "Prefill attention, Llama-3-8B heads, bf16, H100", "prefill_h100.png")  # fmt: skip


def latency_plot() -> None:
    """TTFT and TPOT percentiles against the arrival rate (conversational workload)."""
    d = json.loads((HERE / "results/serving_latency_8b_h100.json").read_text())
    runs = [r for r in d["served"] if r["rate"] != "inf"]
    runs.sort(key=lambda r: r["rate"])
    rates = [r["rate"] for r in runs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for q in ("p50", "p90", "p99"):
        a.plot(rates, [r["ttft_ms"][q] for r in runs], "o-", label=q)
        b.plot(rates, [r["tpot_ms"][q] for r in runs], "o-", label=q)
    a.set_title("TTFT (ms)")
    b.set_title("TPOT (ms)")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("requests/s (Poisson)")
        ax.legend()
    fig.suptitle("8B shape through gRPC, conversational lengths, H100, 2026-12-07")
    fig.tight_layout()
    fig.savefig(HERE / "plots/latency_h100.png", dpi=110)


if __name__ == "__main__":
    w4a16_plot()
    prefill_plot()
    latency_plot()
