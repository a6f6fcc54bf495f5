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


if __name__ == "__main__":
    (HERE / "plots").mkdir(exist_ok=True)
    decode_kernel_plot()
    decode_step_plot()
