"""Executor host time: the model runner's CPU time per decode step, kernels stubbed out.

On a GPU the executor process lays out each step on the host (the plan's rows, the
block table, the sampling parameters), launches it, and later reads its tokens back.
For a small model (Llama-3.2-1B at 256 sequences: a few milliseconds of device time
per step) that host time, not the device, bounds the step. This benchmark measures it
on the CPU, runnable on CI's machine: the real ``ModelRunner`` on its tensor path
(``attention_backend="triton"``), pipelined as the executor runs it (step N+1
submitted before N is collected), with the model's forward, its logits and the
sampling kernel replaced by tensors of the right shape, so what is timed is the host's
Python and numpy work per step (kernel launches, a few on a GPU with CUDA graphs, are
not in it). A tiny random Llama is written to a temporary folder for the runner to load.

    .venv/bin/python benchmarks/executor_host.py --baseline 606fe3a --repeats 5

``--baseline COMMIT`` measures that commit's tree side by side (``host_overhead.py``'s
extraction), runs interleaved so both see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_overhead import baseline_tree  # noqa: E402

CONTEXT = 1000  # tokens per sequence: 63 blocks of 16 in each row's table
BLOCK_SIZE = 16


def tiny_model(directory: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)


def run_worker(model: str, batch: int, steps: int) -> dict:
    import torch
    from decode_step import place_decodes  # benchmarks/ on sys.path

    import tessera.kernels.sampling as sampling_kernels
    from tessera.common.executor_config import ExecutorConfig
    from tessera.executor.model_runner import ModelRunner

    per = -(-(CONTEXT + 2 * steps + 16) // BLOCK_SIZE)  # as place_decodes lays them out
    runner = ModelRunner(ExecutorConfig(
        model=model, device="cpu", dtype="float32", attention_backend="triton",
        block_size=BLOCK_SIZE, num_kv_blocks=batch * per, max_num_seqs=batch,
        max_num_batched_tokens=max(8192, batch), show_progress=False,
    ))  # fmt: skip
    vocab = runner.model_config.vocab_size
    hidden = runner.model_config.hidden_size
    runner.model.forward = lambda ids, pos, kv, meta: torch.zeros(len(ids), hidden)
    runner.model.compute_logits = lambda h: torch.zeros(h.shape[0], vocab)
    sampling_kernels.sample = lambda logits, params: torch.zeros(logits.shape[0], dtype=torch.int64)
    _, step, _ = place_decodes(runner, batch, CONTEXT, steps, "bench-")
    for _ in range(2):  # (place_decodes ran 3 steps)
        runner.execute(step)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    prev = runner.submit(step)
    for _ in range(steps):
        cur = runner.submit(step)
        runner.collect(prev)
        prev = cur
    runner.collect(prev)
    return {
        "batch": batch,
        "steps": steps,
        "cpu_ms_per_step": (time.process_time() - cpu0) / steps * 1e3,
        "wall_ms_per_step": (time.perf_counter() - wall0) / steps * 1e3,
    }


def measure(model: str, batch: int, steps: int, pythonpath: Path | None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the stubs' zeros: no thread pool noise
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    out = subprocess.run(
        [sys.executable, __file__, "--worker", model, str(batch), str(steps)],
        env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--steps", type=int, default=300, help="measured steps per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", help="a commit to measure side by side")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model, batch, steps = args.worker
        print(json.dumps(run_worker(model, int(batch), int(steps))))
        return 0

    scratch = Path(tempfile.mkdtemp(prefix="tessera-executor-host-"))
    try:
        model = scratch / "tiny-llama"
        tiny_model(model)
        trees: dict[str, Path | None] = {"current": None}
        if args.baseline:
            trees = {"baseline": baseline_tree(args.baseline, scratch / "baseline"),
                     "current": None}  # fmt: skip
        runs: dict[str, dict[int, list[dict]]] = {name: {} for name in trees}
        for batch in args.batch:
            for _ in range(args.repeats):  # interleaved: both trees see the same load
                for name, path in trees.items():
                    runs[name].setdefault(batch, []).append(
                        measure(str(model), batch, args.steps, path)
                    )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    results = {
        name: {
            batch: {
                "cpu_ms_per_step_median": statistics.median(r["cpu_ms_per_step"] for r in rs),
                "cpu_ms_per_step_min": min(r["cpu_ms_per_step"] for r in rs),
                "runs": rs,
            }
            for batch, rs in by_batch.items()
        }
        for name, by_batch in runs.items()
    }
    print(f"{'batch':>6} {'tree':<9} {'cpu ms/step':>12} {'(min)':>7}")
    for batch in args.batch:
        for name in trees:
            r = results[name][batch]
            print(f"{batch:>6} {name:<9} {r['cpu_ms_per_step_median']:>12.3f} "
                  f"{r['cpu_ms_per_step_min']:>7.3f}")  # fmt: skip
        if args.baseline:
            ratio = (results["baseline"][batch]["cpu_ms_per_step_median"]
                     / results["current"][batch]["cpu_ms_per_step_median"])  # fmt: skip
            print(f"{batch:>6} {'speed-up':<9} {ratio:>11.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv[1:], "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
