"""Where an executor's start-up goes (issue 19): the recovery path waits on it.

Times, in one fresh process, what ``executor.server.run_executor`` does before it says
ready: importing torch and the model runner, loading the weights (GGUF dequantization
included), warming the CPU attention kernel (numba), building the model and the KV pool,
and one first decode step (lazy initialisations). Run on an idle machine:

    .venv/bin/python benchmarks/executor_startup.py [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import time

T0 = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    marks: list[tuple[str, float]] = []
    last = T0

    def mark(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        marks.append((name, now - last))
        last = now

    import torch  # noqa: F401

    mark("import torch")
    from tessera.common.executor_config import ExecutorConfig
    from tessera.common.registry import resolve_model
    from tessera.executor import cpu_attention
    from tessera.executor.model_runner import ModelRunner
    from tessera.executor.weights import load_weights

    mark("import the model runner")
    source = resolve_model(args.model)
    mark("resolve the model")
    load_weights(source, dtype=torch.float32, device=torch.device(args.device))
    mark("load weights (alone, for the split)")
    if cpu_attention.available():
        cpu_attention.warm_up()
    mark("warm up the CPU attention kernel (alone)")
    ModelRunner(ExecutorConfig(model=args.model, device=args.device, max_model_len=256))
    mark("ModelRunner: weights, warm-up, model, KV pool (as a restart does)")
    total = sum(seconds for _, seconds in marks)
    for name, seconds in marks:
        print(f"{seconds:7.2f} s  {name}")
    print(f"{total:7.2f} s  in all (the ModelRunner line is what a restart pays after imports)")


if __name__ == "__main__":
    main()
