"""benchmarks/served_overhead.py and serving.py's client: the served stack with a mirror
executor at a small scale, its client in two processes. Not a timing assertion (the
machine may be busy): what fails is a broken harness: tokens lost or counted twice
between the client and the mirror, CPU not read, the in-process bound miscounted."""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import served_overhead  # noqa: E402
import serving  # noqa: E402


def test_arrivals_are_poisson_offsets_from_the_seed_and_at_once_for_inf():
    assert serving.arrival_offsets(5, float("inf"), 0) == [0.0] * 5
    offsets = serving.arrival_offsets(4, 2.0, 7)
    rng = random.Random(7)
    gaps = [rng.expovariate(2.0) for _ in range(3)]
    assert offsets == pytest.approx([0.0, gaps[0], gaps[0] + gaps[1], sum(gaps)])


def test_the_in_process_bound_counts_the_steps_of_the_scheduler_alone():
    # Three prompts that fit one step: one prefill step samples each request's first
    # token, then one decode step per further token of the longest (7 tokens): 7 steps.
    args = argparse.Namespace(input_len=(16, 16), output_len=(8, 8), max_num_seqs=8,
                              max_num_batched_tokens=64)  # fmt: skip
    work = [([5] * 10, 5), ([6] * 12, 7), ([7] * 9, 3)]
    assert served_overhead.ideal_steps(work, args) == 7
    # A budget of 16 tokens a step splits the prompts (31 tokens) over more steps.
    args.max_num_batched_tokens = 16
    assert served_overhead.ideal_steps(work, args) > 7


@pytest.mark.slow
def test_the_benchmark_counts_every_token_once_with_two_client_processes(tmp_path):
    record_path = tmp_path / "served.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "served_overhead.py"), "--num-requests",
         "48", "--input-len", "16", "64", "--output-len", "16", "48", "--max-num-seqs", "8",
         "--step-ms", "2", "--repeats", "1", "--client-processes", "2",
         "--json", str(record_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    record = json.loads(record_path.read_text())
    [one] = record["results"]["current"]["passes"]
    args = argparse.Namespace(num_requests=48, input_len=(16, 64), output_len=(16, 48),
                              seed=0, workload="uniform")  # fmt: skip
    expected = sum(o for _, o in serving.workload(args))
    # The client counted every token of every stream; the mirror sampled each once.
    assert one["output_tokens"] == one["sampled_tokens"] == expected
    # At most 8 sequences at once, so at most 8 tokens a step, served and in-process
    # (whose FCFS order is the workload's; the served one is the order of arrival).
    assert 0 < one["tokens_per_step"] <= 8
    assert one["steps"] >= expected / 8 and record["ideal_steps"] >= expected / 8
    # CPU is read in clock ticks (10 ms): a process that did little may read 0; the
    # gateway and the client stream every token of the pass and never do.
    for name in ("gateway", "scheduler", "mirror", "client"):
        assert math.isfinite(one["us_per_token"][name]) and one["us_per_token"][name] >= 0
    assert one["us_per_token"]["gateway"] > 0 and one["us_per_token"]["client"] > 0
    assert 0 < record["results"]["current"]["served_over_ideal"] <= 1.05
