"""Tensor parallelism: offline throughput at N ranks against N = 1, and the cost of
sending one step plan to N ranks.

    # the CPU (gloo): N = 2 against N = 1 on a model whose heads split by 2
    .venv/bin/python benchmarks/tensor_parallel.py --sizes 1,2

    # one H200, N = 1 only: today's numbers, the same workloads and engine settings as
    # benchmarks/gpu_offline.py (compare with its last recorded run, RESULTS.md)
    .venv/bin/python benchmarks/tensor_parallel.py --device cuda --sizes 1 \\
        --model random:llama-3.1-8b --fixed 1000 1000 512 --mixed 1000 --json tp1.json

    # several GPUs (issue 21): a model no one GPU holds, against one rank's roofline
    .venv/bin/python benchmarks/tensor_parallel.py --device cuda --sizes 4,8 \\
        --model random:llama-3.1-70b --fixed 1000 1000 1024 --mixed 1000 --json tp70b.json

On a 2-core machine N = 2 shows the communication cost (two all-reduces per layer, an
all-gather of the logits and a token broadcast per step, through gloo over loopback),
not a speed-up. The plan fan-out part times what the scheduler does per step: encode a
plan of B requests and send it once on the PUB that N ranks read, against encoding and
sending it on N PAIR sockets.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_offline's workloads

from decode_step import kv_bytes_per_token, weight_bytes  # noqa: E402
from gpu_offline import fixed_workload, mixed_workload, run_tessera  # noqa: E402
from roofline import measured_rates, shape_of, workload_s  # noqa: E402


def plan_fanout(num_ranks: int, batch: int, repeats: int = 200) -> dict:
    """Microseconds per step to put one decode plan of ``batch`` requests in front of
    ``num_ranks`` readers: one PUB send, or one PAIR send per rank."""
    import tempfile

    import zmq

    from tessera.common.plan import CachedRequestData, StepPlan
    from tessera.common.plan_bus import PlanPublisher, PlanSubscriber
    from tessera.common.wire import encode, plan_to_pb

    plan = StepPlan(
        cached_requests=[CachedRequestData(f"r{i}", [i]) for i in range(batch)],
        num_scheduled_tokens={f"r{i}": 1 for i in range(batch)},
    )
    ctx = zmq.Context()
    d = tempfile.mkdtemp()
    pub = PlanPublisher(ctx, f"ipc://{d}/plans")
    pub.expect("t")
    subs = [PlanSubscriber(ctx, pub.address, "t") for _ in range(num_ranks)]
    while pub.poll_subscriptions() < num_ranks:
        time.sleep(0.01)
    pairs = []
    for i in range(num_ranks):
        a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        a.bind(f"ipc://{d}/pair{i}")
        b.connect(f"ipc://{d}/pair{i}")
        pairs.append((a, b))
    out = {}
    for name in ("pub", "pairs"):
        t0 = time.perf_counter()
        for step in range(1, repeats + 1):
            if name == "pub":
                pub.publish(encode(plan_to_pb(plan, step)))
                for s in subs:
                    s.recv()
            else:
                for a, _ in pairs:
                    a.send(encode(plan_to_pb(plan, step)))
                for _, b in pairs:
                    b.recv()
        out[f"{name}_us_per_step"] = (time.perf_counter() - t0) / repeats * 1e6
    for s in subs:
        s.close()
    for a, b in pairs:
        a.close()
        b.close()
    pub.close()
    ctx.term()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="random:qwen2.5-0.5b", help="heads must split by N")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--sizes", default="1,2", help="tensor_parallel_size values, in order")
    ap.add_argument("--fixed", nargs=3, type=int, action="append", metavar=("IN", "OUT", "N"))
    ap.add_argument("--mixed", type=int, default=0, metavar="N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--kv-cache-memory", type=int, default=1 << 28, help="CPU, per rank")
    ap.add_argument("--fanout-batch", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    from tessera import LLM

    sizes = [int(s) for s in args.sizes.split(",")]
    rates = None  # (copy bandwidth, matmul rate), measured once, on CUDA
    fixed = args.fixed or ([[64, 32, 8]] if args.device == "cpu" else [[1000, 1000, 512]])
    results: dict = {"model": args.model, "device": args.device, "runs": {}}
    results["plan_fanout"] = {
        n: plan_fanout(n, args.fanout_batch) for n in sorted({*sizes, 2, 4, 8})
    }
    print(f"plan fan-out (B={args.fanout_batch}):", json.dumps(results["plan_fanout"]))
    for n in sizes:
        kwargs = dict(
            device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len, show_progress=False, tensor_parallel_size=n,
        )  # fmt: skip
        if args.device == "cpu":
            kwargs["kv_cache_memory"] = args.kv_cache_memory
        t0 = time.perf_counter()
        llm = LLM(args.model, **kwargs)
        load_s = time.perf_counter() - t0
        vocab = llm.model_config.vocab_size
        work = {
            f"fixed {i}/{o} x{k}": fixed_workload(k, i, o, vocab, args.seed) for i, o, k in fixed
        }
        if args.mixed:
            work[f"mixed x{args.mixed}"] = mixed_workload(args.mixed, vocab, args.seed)
        run = {"load_s": load_s}
        run_tessera(llm, list(work.values())[0][:2])  # warm-up (numba, kernels, graphs)
        shape = None
        if args.device == "cuda":  # one rank's share: its slices, 1/N of the FLOPs
            runner = llm.runner
            shape = shape_of(runner.model_config, weight_bytes(runner),
                             kv_bytes_per_token(runner), tp=n)  # fmt: skip
            bw, rate = rates = rates or measured_rates(torch.device("cuda"))
        for name, w in work.items():
            run[name] = run_tessera(llm, w)
            roofline = ""
            if shape is not None:
                pool = llm.runner.num_blocks * llm.runner.block_size
                least = workload_s(shape, [(len(p), o) for p, o in w], args.max_num_seqs,
                                   pool, bw, rate)  # fmt: skip
                run[name]["roofline_tok_per_s"] = run[name]["output_tokens"] / least
                run[name]["vs_roofline"] = run[name]["tok_per_s"] / run[name]["roofline_tok_per_s"]
                roofline = (f", per-rank roofline {run[name]['roofline_tok_per_s']:.0f} "
                            f"({run[name]['vs_roofline']:.2f} of it)")  # fmt: skip
            print(f"N={n} {name}: {run[name]['tok_per_s']:.1f} output tok/s "
                  f"({run[name]['seconds']:.1f} s){roofline}", flush=True)  # fmt: skip
        results["runs"][n] = run
        llm.close()
        del llm
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
