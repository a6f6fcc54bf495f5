"""benchmarks/host_overhead.py at a small scale: it drives the real scheduler loop to
the end of its window against this tree and against a baseline commit's tree (HEAD
here), and writes a well-formed record. Not a timing assertion: the machine may be
busy; only what would show a broken harness (no steps, missing tokens, the baseline
importing this tree instead of its own) fails it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_benchmark_measures_both_trees_and_writes_its_record(tmp_path):
    record_path = tmp_path / "host.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "host_overhead.py"), "--baseline", "HEAD",
         "--workloads", "decode-64", "churn-256", "--steps", "40", "--warmup", "24",
         "--repeats", "1", "--json", str(record_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "speed-up" in run.stdout
    record = json.loads(record_path.read_text())
    assert record["baseline"] == "HEAD" and record["steps"] == 40
    for tree in ("baseline", "current"):
        for workload, num_seqs in (("decode-64", 64), ("churn-256", 256)):
            summary = record["results"][tree][workload]
            [run_record] = summary["runs"]
            assert run_record["steps"] == 40
            cpu = summary["cpu_ms_per_step_median"]
            assert math.isfinite(cpu) and 0 < cpu < 1000
            assert 0 < summary["thread_ms_per_step_median"] <= cpu * 1.5
            if workload == "decode-64":  # every sequence decodes in every measured step
                assert summary["tokens_per_step_median"] == num_seqs
            else:  # prefill steps sample less; finished sequences are replaced
                assert num_seqs / 2 < summary["tokens_per_step_median"] <= num_seqs
    # The baseline ran its own extracted tree, the current run the checkout's.
    baseline_module = record["results"]["baseline"]["decode-64"]["runs"][0]["scheduler_module"]
    current_module = record["results"]["current"]["decode-64"]["runs"][0]["scheduler_module"]
    assert not baseline_module.startswith(str(REPO))
    assert Path(current_module).resolve().is_relative_to(REPO)
