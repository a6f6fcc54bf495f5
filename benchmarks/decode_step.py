"""Decode step time against the memory roofline, and GPU idle time between steps.

Roofline of one decode step: every weight byte plus every cached K/V byte of the
batch is read once, at the device-to-device copy bandwidth measured in the same
process. Requests are placed straight into the pool with ``ctx - 1`` tokens already
"computed" (the plan's cached-prefix field), so the step reads a real-sized KV
context without a prefill first; contents are zeros, the work and bytes are real.

Reported per batch size: the graph replay alone (forward + lm head, CUDA events),
the whole ``ModelRunner.execute`` (host layout + forward + sampling + the one
device-to-host copy), and both as a fraction of the roofline.

GPU idle: the torch profiler records every kernel of an engine run (``LLM.generate``,
decode-heavy: B prompts of 128 tokens, 256 output tokens); idle = 1 - (union of
kernel intervals) / (first kernel start .. last kernel end).

    python benchmarks/decode_step.py --model random:llama-3.1-8b --batch 1 64 256 --context 1024

Tensor parallel (several GPUs): ``--tensor-parallel-size N`` times rank 0's step, which
waits for the other ranks in every all-reduce, against one rank's share of the roofline
(its slices of the weights and K/V, 1/N of the FLOPs); ``--profile`` then reports the
all-reduce kernels' time as the ``all_reduce`` category (no graph-replay timing: rank 0
cannot replay alone).
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date

import torch
from roofline import decode_step_s, measured_rates, shape_of  # benchmarks/ on sys.path


def weight_bytes(runner) -> int:
    m = runner.model
    total = m.lm_head.numel() * m.lm_head.element_size() + m.norm.numel() * m.norm.element_size()
    for layer in m.layers:
        for name in layer.__slots__:
            t = getattr(layer, name)
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def kv_bytes_per_token(runner) -> int:
    return runner.bytes_per_block // runner.block_size


def place_decodes(runner, batch: int, ctx: int, steps: int, tag: str):
    """Put ``batch`` requests straight into the pool with ``ctx - 1`` tokens computed,
    room for ``2 * steps`` more, and run 3 warm-up steps. Returns (ids, the decode step's
    plan, blocks per request), or None where the pool is too small."""
    from tessera.common.plan import NewRequestData, SamplingOptions, StepPlan

    per = -(-(ctx + 2 * steps + 16) // runner.block_size)
    if batch * per > runner.num_blocks:
        return None
    greedy = SamplingOptions(temperature=0.0)
    ids = [f"{tag}{batch}-{i}" for i in range(batch)]
    plan = StepPlan(
        new_requests=[
            NewRequestData(
                request_id=rid,
                all_token_ids=[1000 + i % 5000] * ctx,
                num_prompt_tokens=ctx,
                sampling=greedy,
                block_ids=list(range(i * per, (i + 1) * per)),
                num_computed_tokens=ctx - 1,
            )
            for i, rid in enumerate(ids)
        ],
        num_scheduled_tokens={rid: 1 for rid in ids},
    )
    runner.execute(plan)
    step = StepPlan(num_scheduled_tokens={rid: 1 for rid in ids})
    for _ in range(3):
        runner.execute(step)
    return ids, step, per


def time_decode(runner, batch: int, ctx: int, steps: int, replay: bool = True) -> dict:
    """One step at a time, pipelined, and (``replay``: never under tensor parallelism,
    where a graph replayed on rank 0 alone would wait in its first all-reduce for ranks
    that replay nothing) the CUDA graph alone."""
    from tessera.common.plan import StepPlan

    placed = place_decodes(runner, batch, ctx, steps, "b")
    if placed is None:
        return {"skipped": f"the pool ({runner.num_blocks} blocks) is too small"}
    ids, step, per = placed
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        runner.execute(step)
    wall = (time.perf_counter() - t0) / steps
    # As the engine runs with async scheduling: step N+1 submitted before N is collected,
    # so the host's layout and the token copy of one step hide behind the other's GPU work.
    # The host's time in submit and in collect, apart: a submit that takes nearly a step
    # waits for the device somewhere (a hidden sync), and the overlap is lost.
    prev = runner.submit(step)
    in_submit = in_collect = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        t1 = time.perf_counter()
        cur = runner.submit(step)
        t2 = time.perf_counter()
        runner.collect(prev)
        in_collect += time.perf_counter() - t2
        in_submit += t2 - t1
        prev = cur
    runner.collect(prev)
    pipelined = (time.perf_counter() - t0) / steps
    replay_s = None
    if replay and runner.graphs is not None and runner.graphs.can_run(batch, per):
        graph, _ = runner.graphs.graphs[next(s for s in runner.graphs.sizes if s >= batch)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            graph.replay()
        end.record()
        end.synchronize()
        replay_s = start.elapsed_time(end) / 1e3 / steps
    runner.execute(StepPlan(finished_request_ids=ids))
    return {
        "context": ctx + steps,
        "step_s": wall,
        "pipelined_step_s": pipelined,
        "pipelined_submit_s": in_submit / steps,
        "pipelined_collect_s": in_collect / steps,
        "replay_s": replay_s,
    }


# Kernel name fragments -> where a decode step's time goes (first match wins).
CATEGORIES = (
    ("attention", ("_decode_kernel", "_merge_splits")),
    ("kv_write", ("_write_kv",)),
    ("norm", ("_rms_norm",)),
    ("rotary", ("_rotary",)),
    ("activation", ("_silu_and_mul",)),
    ("sampling", ("_draw", "argmax", "softmax", "topk", "sort", "bitmask")),
    ("all_reduce", ("nccl", "allreduce", "all_reduce", "allgather", "broadcast")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90", "sm80", "matmul", "w4a16", "splitk")),
    ("copy", ("memcpy", "memset", "copy", "index", "gather", "scatter")),
)


def _category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k.lower() in low for k in keys):
            return cat
    return "elementwise/other"


def _busy(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    busy = 0.0
    spans = sorted(spans)
    cur_s, cur_e = spans[0]
    for s, e in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return busy + cur_e - cur_s


def profile_step(runner, batch: int, ctx: int, steps: int) -> dict:
    """Where a whole decode step's time goes: GPU time per kernel category (the profiler
    sees the kernels inside graph replays), and the rest of the wall time (the GPU idle
    while the host lays out the step, launches, and copies the tokens back)."""
    from torch.profiler import ProfilerActivity, profile

    from tessera.common.plan import StepPlan

    placed = place_decodes(runner, batch, ctx, steps, "p")
    if placed is None:
        return {"skipped": "pool too small"}
    ids, step, _ = placed
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            runner.execute(step)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    runner.execute(StepPlan(finished_request_ids=ids))
    per_cat: dict[str, float] = {}
    names: dict[str, float] = {}
    spans = []
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA or e.time_range.end <= 0:
            continue
        us = e.time_range.end - e.time_range.start
        spans.append((e.time_range.start, e.time_range.end))
        cat = _category(e.name)
        per_cat[cat] = per_cat.get(cat, 0.0) + us
        names[e.name] = names.get(e.name, 0.0) + us
    if not spans:
        return {"batch": batch, "wall_step_s": wall, "error": "the profiler saw no kernels"}
    busy = _busy(spans) / 1e6 / steps
    top = sorted(names.items(), key=lambda kv: -kv[1])[:12]
    return {
        "batch": batch,
        "wall_step_s": wall,
        "gpu_busy_step_s": busy,
        "gpu_idle_step_s": max(wall - busy, 0.0),
        "by_category_s": {
            k: v / 1e6 / steps for k, v in sorted(per_cat.items(), key=lambda kv: -kv[1])
        },
        "top_kernels_s": {k[:90]: v / 1e6 / steps for k, v in top},
    }


def gpu_idle(llm, batch: int, steps: int = 256) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from tessera import SamplingParams

    prompts = [[1000 + (i * 7 + j) % 5000 for j in range(128)] for i in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    # Warm-up on the same workload: first-use Triton compiles are not idle time.
    llm.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > 0
    )
    busy = _busy(spans)
    span = spans[-1][1] - spans[0][0]
    return {
        "batch": batch,
        "output_tokens": batch * steps,
        "wall_s": wall,
        "tok_per_s": batch * steps / wall,
        "idle_fraction": 1 - busy / span,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="random:llama-3.1-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--idle-batch", type=int, nargs="*", default=[64, 256])
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument(
        "--profile", type=int, nargs="*", default=[256], help="batches to profile by kernel"
    )
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="N ranks, one GPU each: the step is rank 0's (which waits for the others in "
        "every all-reduce), its roofline one rank's share of the bytes and FLOPs",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    device = torch.device("cuda")
    bw, rate = measured_rates(device)

    from tessera import LLM

    llm = LLM(
        args.model,
        dtype=args.dtype,
        max_num_seqs=max(args.batch + args.idle_batch),
        max_model_len=args.max_model_len,
        cuda_graphs=not args.no_cuda_graphs,
        kv_cache_dtype=args.kv_cache_dtype,
        show_progress=False,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    runner = llm.runner
    # Rank 0's weights and K/V per token: one rank's share under tensor parallelism.
    wb = weight_bytes(runner)
    kvt = kv_bytes_per_token(runner)
    shape = shape_of(runner.model_config, wb, kvt, tp=args.tensor_parallel_size)
    result = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "model": args.model,
        "tensor_parallel_size": args.tensor_parallel_size,
        "copy_bandwidth_GBps": bw / 1e9,
        "matmul_TFLOPs": rate / 1e12,
        "weight_bytes": wb,
        "kv_bytes_per_token": kvt,
        "decode": [],
        "idle": [],
    }
    for b in args.batch:
        r = time_decode(runner, b, args.context, args.steps, replay=args.tensor_parallel_size == 1)
        if "skipped" not in r:
            # Bytes only (as first published), and each part by bytes or FLOPs (roofline.py).
            roof = (wb + b * r["context"] * kvt) / bw
            full = decode_step_s(shape, b, b * r["context"], bw, rate)
            r["pipelined_vs_roofline_flops"] = (
                decode_step_s(shape, b, b * r["context"], bw, rate) / r["pipelined_step_s"]
            )
            r.update(
                batch=b,
                roofline_s=roof,
                step_vs_roofline=roof / r["step_s"],
                roofline_flops_s=full,
                step_vs_roofline_flops=full / r["step_s"],
            )
            if r["replay_s"]:
                r["replay_vs_roofline"] = roof / r["replay_s"]
                r["replay_vs_roofline_flops"] = full / r["replay_s"]
        print(json.dumps(r), flush=True)
        result["decode"].append(r)
    result["profile"] = []
    for b in args.profile:
        r = profile_step(runner, b, args.context, args.steps)
        print(json.dumps(r), flush=True)
        result["profile"].append(r)
    for b in args.idle_batch:
        for pipelined in (True, False):  # async scheduling on, then off: same run
            llm.engine.pipelined = pipelined
            r = gpu_idle(llm, b)
            r["async_scheduling"] = pipelined
            print(json.dumps(r), flush=True)
            result["idle"].append(r)
        llm.engine.pipelined = True
    llm.close()  # the other tensor-parallel ranks, if any
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
