"""Plots of the H100 results in benchmarks/results/ (matplotlib, not a dependency).

python benchmarks/plot_gpu.py   # writes benchmarks/plots/*.png
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent


def decode_kernel_plot() -> None:
    d = json.loads((HERE / "results/kernels_h100.json").read_text())
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = [r for r in d["decode"] if "paged_gbps" in r]
    for batch in sorted({r["batch"] for r in rows}):
        pts = sorted(
            (r["context"], r["paged_gbps"], r["sdpa_gbps"]) for r in rows if r["batch"] == batch
        )
        (line,) = ax.plot(
            [p[0] for p in pts], [p[1] for p in pts], "o-", label=f"paged, batch {batch}"
        )
        ax.plot([p[0] for p in pts], [p[2] for p in pts], "x--", color=line.get_color(), alpha=0.5)
    ax.axhline(d["copy_gbps"], color="k", lw=1, label=f"copy {d['copy_gbps']:.0f} GB/s")
    ax.axhline(0.8 * d["copy_gbps"], color="k", lw=1, ls=":", label="80% target")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("KV read GB/s")
    ax.set_title("Paged decode attention, H100 bf16 (x--: SDPA on contiguous KV)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "plots/decode_attention_h100.png", dpi=110)


def decode_step_plot() -> None:
    d = json.loads((HERE / "results/decode_step_h100.json").read_text())
    rows = [r for r in d["decode"] if "step_s" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["roofline_s"] * 1e3 for r in rows], 0.2, label="roofline")
    ax.bar(list(x), [r["replay_s"] * 1e3 for r in rows], 0.2, label="graph replay")
    ax.bar([i + 0.2 for i in x], [r["step_s"] * 1e3 for r in rows], 0.2, label="whole step")
    ax.set_xticks(list(x), [f"batch {r['batch']}" for r in rows])
    ax.set_ylabel("ms per decode step")
    ax.set_title("Llama-3.1-8B shape, bf16, context ~1k, H100")
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "plots/decode_step_h100.png", dpi=110)


def offline_plot() -> None:
    """Output tokens/s per workload: Tessera against HF static `generate` where measured
    in the same call, and the 9,000 tok/s target of 1000/1000."""

    def load(name):
        return json.loads((HERE / "results" / name).read_text())["workloads"]

    async_run, first = load("gpu_offline_async_h100.json"), load("gpu_offline_h100.json")
    fp8 = load("gpu_offline_1000_fp8_h100.json")
    smol_mixed, smol_1000 = load("smollm2_mixed_h100.json"), load("smollm2_1000_h100.json")
    rows = [  # (label, tessera tok/s, HF static tok/s or None)
        ("8B mixed x1000", async_run["mixed x1000"]),
        ("8B 1000/1000 bf16 KV", async_run["fixed 1000/1000 x256"]),
        ("8B 1000/1000 fp8 KV", fp8["fixed 1000/1000 x256"]),
        ("8B 128/128", first["fixed 128/128 x256"]),
        ("8B 2048/128", first["fixed 2048/128 x128"]),
        ("8B 128/2048", first["fixed 128/2048 x128"]),
        ("SmolLM2 mixed x1000", smol_mixed["mixed x1000"]),
        ("SmolLM2 1000/1000", smol_1000["fixed 1000/1000 x256"]),
    ]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    xs = range(len(rows))
    ours = [r["tessera"]["tok_per_s"] for _, r in rows]
    hf = [r["hf_static"]["tok_per_s"] if "hf_static" in r else 0 for _, r in rows]
    ax.bar([x - 0.2 for x in xs], ours, 0.4, label="Tessera")
    ax.bar([x + 0.2 for x in xs], hf, 0.4, label="HF static generate (same call)")
    for x, (o, h) in enumerate(zip(ours, hf, strict=True)):
        if h:
            ax.text(x, o * 1.08, f"{o / h:.0f}x", ha="center", fontsize=8)
    ax.axhline(9000, color="gray", ls=":", lw=1)
    ax.text(len(rows) - 0.5, 9000 * 1.05, "1000/1000 target", ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(list(xs), [label for label, _ in rows], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("output tokens/s")
    ax.set_title("Offline throughput, one H100 (Llama-3.1-8B shape random bf16; SmolLM2 real)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "plots/offline_throughput_h100.png", dpi=110)


if __name__ == "__main__":
    (HERE / "plots").mkdir(exist_ok=True)
    decode_kernel_plot()
    decode_step_plot()
    offline_plot()
