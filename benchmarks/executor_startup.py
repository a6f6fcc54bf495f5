"""Where an executor's start-up goes (issue 19): the recovery path waits on it.

Each run is a fresh process that does what ``executor.server.run_executor`` does before
it says ready: import torch and the model runner, then build one ``ModelRunner``. The
runner's phases are timed by wrapping the functions it calls (nothing is done twice):
reading the GGUF (metadata and tensor directory), dequantizing, warming the CPU
attention kernel (numba), building the model (packing its linears), allocating the KV
pool. Runs are repeated and each phase's minimum reported, since other processes on a
shared machine only ever add time; each run's CPU time (user + system) is printed too, a
bound on its wall time that load does not inflate much. Run on an idle machine:

    .venv/bin/python benchmarks/executor_startup.py [--model smollm2-135m-instruct] [--runs 3]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable

T0 = time.perf_counter()

PHASES = (
    "import torch",
    "import the model runner",
    "read the GGUF (metadata, tensor directory)",
    "dequantize the weights",
    "warm up the CPU attention kernel",
    "build the model (pack the linears)",
    "allocate the KV pool",
    "ModelRunner: everything else",
)


def _timed(fn: Callable, seconds: dict[str, float], phase: str) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - start

    return wrapper


def one_run(model: str, device: str) -> dict[str, float]:
    """Phase -> seconds of one start in this (fresh) process."""
    seconds: dict[str, float] = {}
    import torch  # noqa: F401

    seconds[PHASES[0]] = time.perf_counter() - T0
    start = time.perf_counter()
    from tessera.common.executor_config import ExecutorConfig
    from tessera.executor import cpu_attention, model_runner
    from tessera.executor.weights import gguf

    seconds[PHASES[1]] = time.perf_counter() - start
    gguf.read_gguf = _timed(gguf.read_gguf, seconds, PHASES[2])
    gguf._read_tensors = _timed(gguf._read_tensors, seconds, PHASES[3])
    cpu_attention.warm_up = _timed(cpu_attention.warm_up, seconds, PHASES[4])
    model_class = model_runner.model_class
    model_runner.model_class = lambda mc: _timed(model_class(mc), seconds, PHASES[5])
    model_runner.zeroed_pool = _timed(model_runner.zeroed_pool, seconds, PHASES[6])
    start = time.perf_counter()
    config = ExecutorConfig(model=model, device=device, max_model_len=256, show_progress=False)
    model_runner.ModelRunner(config)
    runner_seconds = time.perf_counter() - start
    seconds[PHASES[7]] = runner_seconds - sum(seconds.get(p, 0.0) for p in PHASES[2:7])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes; minimum reported")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child run
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.model, args.device)))
        return
    runs = []
    for _ in range(args.runs):
        load = os.getloadavg()[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        child = [sys.executable, __file__, "--one", "--model", args.model, "--device", args.device]
        out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        runs.append(json.loads(out.splitlines()[-1]))
        wall = sum(runs[-1].values())
        print(f"run {len(runs)}: {wall:6.2f} s wall, {cpu:6.2f} s CPU (load average {load:.2f})")
    print(f"{'best':>7}  {'median':>7}  phase (of {len(runs)} fresh processes)")
    for phase in PHASES:
        values = sorted(run.get(phase, 0.0) for run in runs)
        print(f"{values[0]:7.2f}  {values[len(values) // 2]:7.2f}  {phase}")
    totals = sorted(sum(run.values()) for run in runs)
    median = totals[len(totals) // 2]
    print(f"{totals[0]:7.2f}  {median:7.2f}  in all: a restart, process start to ready")


if __name__ == "__main__":
    main()
