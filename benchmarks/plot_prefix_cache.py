"""Plot of benchmarks/prefix_cache.py results: cache on against off, per workload.

    python benchmarks/plot_prefix_cache.py results/prefix_cache_cpu.json:shared,multiturn \\
        results/prefix_cache_h200.json   # writes benchmarks/plots/prefix_cache.png

``PATH:W1,W2`` plots only those workloads of a result.

matplotlib is not a dependency: run it from any environment that has it.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent


def medians(result: dict, mode: str, workload: str) -> tuple[float, float]:
    runs = [r[workload] for r in result["runs"][mode]]
    return (
        statistics.median(r["output_tok_per_s"] for r in runs),
        statistics.median(r["ttft_ms"]["p50"] for r in runs),
    )


def main(paths: list[str]) -> None:
    chosen = [p.split(":", 1) if ":" in p else (p, "") for p in paths]
    results = [json.loads((HERE / p).read_text()) for p, _ in chosen]
    fig, axes = plt.subplots(2, len(results), figsize=(5.5 * len(results), 7), squeeze=False)
    for col, (result, (_, only)) in enumerate(zip(results, chosen, strict=True)):
        where = result.get("gpu", result["device"])
        workloads = only.split(",") if only else list(result["runs"]["on"][0])
        x = range(len(workloads))
        for row, (metric, label) in enumerate(
            ((0, "output tokens/s"), (1, "TTFT p50 (ms, log)"))
        ):
            ax = axes[row][col]
            for shift, mode, color in ((-0.2, "off", "#999999"), (0.2, "on", "#1f77b4")):
                values = [medians(result, mode, w)[metric] for w in workloads]
                bars = ax.bar([i + shift for i in x], values, 0.4, label=f"cache {mode}",
                              color=color)  # fmt: skip
                if mode == "on":
                    for i, (b, w) in enumerate(zip(bars, workloads, strict=True)):
                        off = medians(result, "off", w)[metric]
                        ratio = values[i] / off if metric == 0 else off / values[i]
                        ax.annotate(f"{ratio:.2f}x", (b.get_x() + b.get_width() / 2,
                                    b.get_height()), ha="center", va="bottom")  # fmt: skip
            ax.set_xticks(list(x), workloads)
            ax.set_ylabel(label)
            if metric == 1:
                ax.set_yscale("log")
            ax.set_title(f"{result['model']} on {where}")
            ax.legend()
    fig.tight_layout()
    out = HERE / "plots" / "prefix_cache.png"
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
