"""Plot of the 2026-12-08 CPU runs of benchmarks/served_overhead.py (matplotlib, not a
dependency).

python benchmarks/plot_dec08.py   # writes benchmarks/plots/served_overhead_cpu.png
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
RUNS = [  # (label, results file, tree)
    ("1 gateway, 1 client\n(before OutputRow)", "served_overhead_cpu_dec08_outputrow.json",
     "baseline"),
    ("1 gateway, 1 client", "served_overhead_cpu_dec08_g1c1.json", "current"),
    ("1 gateway, 2 clients", "served_overhead_cpu_dec08_g1c2.json", "current"),
    ("2 gateways, 1 client", "served_overhead_cpu_dec08_g2c1.json", "current"),
    ("2 gateways, 2 clients", "served_overhead_cpu_dec08_g2c2.json", "current"),
]  # fmt: skip


def main() -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for x, (_, name, tree) in enumerate(RUNS):
        record = json.loads((HERE / "results" / name).read_text())
        ideal = record["ideal_output_tok_per_s"]
        result = record["results"][tree]
        ax.bar(x, result["served_over_ideal"], color="tab:blue" if x else "tab:grey")
        passes = [p["output_tok_per_s"] / ideal for p in result["passes"]]
        ax.plot([x] * len(passes), passes, "k.", ms=6)
    ax.axhline(0.95, color="tab:red", lw=1, ls="--", label="target (issue 22): 0.95")
    ax.set_xticks(range(len(RUNS)), [r[0] for r in RUNS], fontsize=8)
    ax.set_ylim(0.5, 1.0)
    ax.set_ylabel("served / scheduler alone (median, dots: passes)")
    ax.set_title("Served stack against a 10 ms mirror executor, 2-core VM, 2026-12-08",
                 fontsize=10)  # fmt: skip
    ax.legend(loc="lower right")
    fig.tight_layout()
    out = HERE / "plots" / "served_overhead_cpu.png"
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
