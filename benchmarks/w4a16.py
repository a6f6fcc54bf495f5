"""4-bit weights (kernels/w4a16.py) against bf16, on the GPU, in one process.

GEMM alone, Llama-3.1-8B layer shapes (fused q/k/v, o, fused gate/up, down), random
4-bit GPTQ weights (group 128, symmetric; ``--act-order`` adds a random ``perm``), at
M = 1, 16, 32, 64, 128, 256, 4096 rows (``--rows``):

- ``bf16``: ``F.linear`` on the bf16 weight (cuBLAS);
- ``fused``: a W4A16 Triton kernel with the launcher's tiles for the shape (``TUNED``'s,
  else the heuristic's: the GEMV for one row, the tensor-core kernel otherwise);
- ``dequant_mm``: ``dequantize_w4`` then ``torch.mm``;
- ``auto``: ``w4a16_matmul`` as the engine calls it, which picks one of the two
  (``auto_path``; ``uses_dequant_mm``).

Reported: microseconds, 4-bit weight bytes read per second over the measured copy
bandwidth (the small-M target is >= 0.7 at M = 1), TFLOP/s over the bf16 rate of the
same shape (the large-M target is >= 0.6). Each call is timed as a CUDA-graph replay
over enough weight copies that none is found in L2; medians of CUDA-event timings.

Decode step at batch 1, 16, 64 (``random:llama-3.1-8b``, bf16 activations, ``--context``
tokens of KV): ``ModelRunner.execute`` of one decode step, bf16 weights against 4-bit
(``quantization="gptq"``), with the KV pool each gets at the same memory utilization.

``--sweep SECONDS`` first times, at each of ``--sweep-rows`` and each shape, dequantize +
mm and then candidate tile configs of the fused kernels (each result checked against
float32; the launcher's own config with its split-K fixup flipped), for at most SECONDS.
It keeps the fastest fused config of each shape and row count in ``w4a16.TUNED`` for the
rest of the run, or, where dequantize + mm was faster (from ``UNTUNED_DEQUANT_MIN_M``
rows), removes the key so the launcher dequantizes there; it prints each decision and
the TUNED entries to paste into ``kernels/w4a16.py``. The default sweep (16-256 rows,
about 45 configs, most of the time in compiling them) takes about 2-3 minutes on an
H200; with ``--skip-decode`` the whole run stays under 5.

    python benchmarks/w4a16.py --sweep 200 --skip-decode --json benchmarks/results/w4a16_h200.json
    python benchmarks/w4a16.py --dry-run   # CPU: tiny shapes under TRITON_INTERPRET=1
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from datetime import date

LLAMA_8B = {  # name -> (K, N) of y = x @ W
    "qkv": (4096, 6144),
    "o": (4096, 4096),
    "gate_up": (4096, 28672),
    "down": (14336, 4096),
}
TINY = {"qkv": (128, 96), "down": (256, 64)}


def _timer(fn, device, iters: int) -> float:
    """Median seconds of one ``fn()`` call: a CUDA graph of ``iters`` calls on the GPU."""
    import torch

    if device.type != "cuda":
        fn()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) / iters
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compile and warm up outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return statistics.median(times)


def copy_bandwidth(device, nbytes: int = 2 * 1024**3) -> float:
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = _timer(lambda: dst.copy_(src), device, 5)
    return 2 * nbytes / seconds  # bytes read plus bytes written


def _time_shape(x, dense, qweights, scales, perm, group: int, iters: int):
    """Seconds per call of bf16 F.linear, the fused kernel, dequantize + mm and the
    launcher's own choice between them, each cycling through its weight copies (so L2
    holds none of them)."""
    import torch.nn.functional as F

    from tessera.kernels.w4a16 import dequantize_w4, w4a16_matmul

    state = {"dense": 0, "q": 0}

    def nxt(key: str, items: list):
        state[key] = (state[key] + 1) % len(items)
        return items[state[key]]

    def fused():
        return w4a16_matmul(x, nxt("q", qweights), scales, None, perm, group, dequant_min_m=None)

    def dequant_mm():
        w = dequantize_w4(nxt("q", qweights), scales, None, perm, group, dtype=x.dtype)
        return x @ w

    def chosen():
        return w4a16_matmul(x, nxt("q", qweights), scales, None, perm, group)

    return (
        _timer(lambda: F.linear(x, nxt("dense", dense)), x.device, iters),
        _timer(fused, x.device, iters),
        _timer(dequant_mm, x.device, iters),
        _timer(chosen, x.device, iters),
    )


def bench_gemm(shapes: dict, rows: list[int], device, act_order: bool, iters: int) -> list[dict]:
    import torch

    from tessera.kernels.w4a16 import default_config, dequantize_w4, uses_dequant_mm

    gen = torch.Generator(device=device).manual_seed(0)
    results = []
    for name, (k, n) in shapes.items():
        group = 128 if k % 128 == 0 else 32
        w4_bytes = k * n // 2 + (k // group) * n * 2
        copies = max(2, -(-(512 << 20) // (k * n // 2))) if device.type == "cuda" else 1
        qweights = [
            torch.randint(-(2**31), 2**31 - 1, (k // 8, n), generator=gen, device=device,
                          dtype=torch.int32)
            for _ in range(copies)
        ]  # fmt: skip
        scales = torch.full((k // group, n), 0.02 / 4.6, dtype=torch.float16, device=device)
        perm = torch.randperm(k, device=device).to(torch.int32) if act_order else None
        dense = [dequantize_w4(q, scales, None, perm, group, dtype=torch.bfloat16).t().contiguous()
                 for q in qweights[: min(copies, 4)]]  # fmt: skip
        bf16_copies = max(2, -(-(512 << 20) // (k * n // 2))) if device.type == "cuda" else 1
        dense = (dense * (-(-bf16_copies // len(dense))))[:bf16_copies]
        for m in rows:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=gen)
            times = _time_shape(x, dense, qweights, scales, perm, group, iters)
            t_bf16, t_fused, t_deq, t_auto = times
            flops = 2 * m * k * n
            r = {
                "shape": name, "K": k, "N": n, "M": m,
                "bf16_us": t_bf16 * 1e6, "fused_us": t_fused * 1e6, "dequant_mm_us": t_deq * 1e6,
                "auto_us": t_auto * 1e6,
                "auto_path": "dequant_mm" if uses_dequant_mm(m, n, k) else "fused",
                "fused_config": repr(default_config(m, n, k, group, device)),
                "fused_weight_GBps": w4_bytes / t_fused / 1e9,
                "bf16_TFLOPs": flops / t_bf16 / 1e12,
                "fused_TFLOPs": flops / t_fused / 1e12,
                "dequant_mm_TFLOPs": flops / t_deq / 1e12,
                "fused_speedup": t_bf16 / t_fused,
                "dequant_mm_speedup": t_bf16 / t_deq,
                "auto_speedup": t_bf16 / t_auto,
            }  # fmt: skip
            print(json.dumps(r), flush=True)
            results.append(r)
    return results


def bench_decode(model: str, batches: list[int], context: int, steps: int, device) -> list[dict]:
    """One decode step of ``batch`` requests with ``context`` cached tokens each."""
    import torch
    from decode_step import place_decodes  # benchmarks/ on sys.path

    from tessera import LLM
    from tessera.common.plan import StepPlan

    results = []
    for quantization in ("none", "gptq"):
        llm = LLM(model, dtype="bfloat16" if device.type == "cuda" else "float32",
                  device=device.type, quantization=quantization, max_num_seqs=max(batches),
                  max_model_len=context + steps + 64, show_progress=False,
                  **({"kv_cache_memory": 1 << 28} if device.type == "cpu" else {}))  # fmt: skip
        runner = llm.runner
        for batch in batches:
            placed = place_decodes(runner, batch, context, steps, quantization)
            if placed is None:
                raise RuntimeError(f"the KV pool holds fewer than {batch} x {context} tokens")
            ids, step, _ = placed
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                runner.execute(step)
            seconds = (time.perf_counter() - start) / steps
            runner.execute(StepPlan(finished_request_ids=ids))
            r = {"quantization": quantization, "batch": batch, "context": context,
                 "step_ms": seconds * 1e3,
                 "kv_pool_tokens": runner.num_blocks * runner.block_size}  # fmt: skip
            print(json.dumps(r), flush=True)
            results.append(r)
        del llm, runner
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = {r["batch"]: r["step_ms"] for r in results if r["quantization"] == "none"}
    for r in results:
        r["speedup_vs_bf16"] = base[r["batch"]] / r["step_ms"]
    return results


def _sweep_configs(m: int) -> list:
    """Candidate tiles of the fused kernels at ``m`` rows: the GEMV for one row, else the
    tensor-core kernel (``kernel="tc"``); the first dot kernel competes through the sweep's
    baseline, TUNED's tiles for the bucket. Each compiles once per split/no-split variant
    (a second or two), so the lists stay short. Every config here compiles for sm_90
    without spilling registers, in at most 196 KB of shared memory; ``scale_after``
    variants for up to 64 rows, where it saves instructions (compiled and counted)."""
    from tessera.kernels.w4a16 import W4Config

    if m == 1:
        return [W4Config(1, bn, 128, 0, w, 3, programs_per_sm=p)
                for bn in (64, 128, 256) for w in (2, 4, 8) for p in (4, 8, 16)] + [
                W4Config(1, 128, 64, 0, 4, 3, programs_per_sm=8)]  # fmt: skip

    def tc(bm, bn, bk, split_k, warps, stages, **kw):
        return W4Config(bm, bn, bk, split_k, warps, stages, kernel="tc", **kw)

    if m <= 32:  # decode: one row tile, split-K over the multiprocessors
        bm = 16 if m <= 16 else 32
        return [tc(bm, 128, 128, 0, 4, 3, programs_per_sm=2),
                tc(bm, 128, 128, 0, 4, 3, programs_per_sm=4, fixup=True),
                tc(bm, 64, 128, 0, 4, 4, programs_per_sm=4),
                tc(bm, 128, 128, 0, 4, 3, programs_per_sm=2, swap=True),
                tc(bm, 256, 128, 0, 8, 3, programs_per_sm=2, swap=True),
                tc(bm, 128, 128, 0, 4, 3, programs_per_sm=2, scale_after=True),
                tc(bm, 128, 128, 0, 4, 3, programs_per_sm=2, swap=True, scale_after=True),
                tc(bm, 128, 128, 0, 4, 3, programs_per_sm=4, swap=True, scale_after=True,
                   fixup=True)]  # fmt: skip
    if m <= 64:
        return [tc(64, 128, 128, 0, 4, 3, programs_per_sm=2),
                tc(64, 128, 128, 0, 4, 4, programs_per_sm=1),
                tc(64, 64, 128, 0, 4, 4, programs_per_sm=4),
                tc(64, 256, 64, 0, 8, 3, programs_per_sm=1),
                tc(64, 128, 128, 0, 4, 3, programs_per_sm=2, swap=True),
                tc(64, 128, 128, 0, 4, 3, programs_per_sm=2, scale_after=True),
                tc(64, 128, 128, 0, 4, 3, programs_per_sm=2, swap=True, scale_after=True)
                ]  # fmt: skip
    # 128 rows and up: 128x128 tiles alone leave most multiprocessors idle on N = 4096
    # (32 tiles), hence smaller tiles and split-K next to them.
    wide = [tc(128, 128, 128, 1, 8, 3),
            tc(128, 128, 128, 0, 8, 3, programs_per_sm=1),
            tc(128, 128, 64, 1, 8, 4),
            tc(128, 256, 64, 1, 8, 3),
            tc(64, 128, 128, 0, 4, 3, programs_per_sm=1),
            tc(64, 128, 128, 0, 4, 3, programs_per_sm=1, scale_after=True),
            # The weight tile as the dot's register operand (swap): each weight is
            # dequantized once per row tile, and only x^T goes through shared memory.
            tc(128, 128, 128, 0, 8, 3, programs_per_sm=1, swap=True),
            tc(128, 128, 64, 0, 4, 4, programs_per_sm=1, swap=True)]  # fmt: skip
    if m <= 128:
        return wide + [tc(128, 64, 128, 1, 4, 3)]
    # One row tile of 256: every weight dequantized once per step (compiled for sm_90:
    # 225 and 255 registers, no spills; 120 and 224 KB of shared memory).
    return wide + [tc(256, 128, 64, 1, 8, 3),
                   tc(256, 128, 64, 0, 8, 3, programs_per_sm=1, swap=True),
                   tc(256, 128, 128, 0, 8, 3, programs_per_sm=1, swap=True)]  # fmt: skip


def _sweep_weights(k: int, n: int, device, gen):
    import torch

    from tessera.kernels.w4a16 import dequantize_w4

    group = 128 if k % 128 == 0 else 32
    copies = max(2, -(-(256 << 20) // (k * n // 2))) if device.type == "cuda" else 1
    qweights = [
        torch.randint(-(2**31), 2**31 - 1, (k // 8, n), generator=gen, device=device,
                      dtype=torch.int32)
        for _ in range(copies)
    ]  # fmt: skip
    scales = torch.full((k // group, n), 0.02 / 4.6, dtype=torch.float16, device=device)
    ref_w = dequantize_w4(qweights[0], scales, None, None, group, dtype=torch.float32)
    return qweights, scales, group, ref_w


def _sweep_one(weights, m: int, device, iters: int, deadline: float, gen):
    """Dequantize + mm at ``m`` rows of one shape, then every candidate config: the
    sweep's, then the launcher's own (TUNED's or the heuristic's), with the split-K fixup
    flipped."""
    import dataclasses

    import torch

    from tessera.kernels.w4a16 import default_config, dequantize_w4, w4a16_matmul

    qweights, scales, group, ref_w = weights
    k, n = ref_w.shape
    state = {"i": 0}

    def fused(x, config):
        state["i"] = (state["i"] + 1) % len(qweights)
        return w4a16_matmul(x, qweights[state["i"]], scales, None, None, group, config=config,
                            dequant_min_m=None)  # fmt: skip

    def dequant_mm(x):
        state["i"] = (state["i"] + 1) % len(qweights)
        return x @ dequantize_w4(qweights[state["i"]], scales, None, None, group, dtype=x.dtype)

    x = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=gen)
    ref = x.float() @ ref_w
    if time.perf_counter() > deadline:
        return
    yield {"M": m, "dequant_mm": True, "us": _timer(lambda: dequant_mm(x), device, iters) * 1e6}
    base = default_config(m, n, k, group, device)
    configs = _sweep_configs(m) + [base, dataclasses.replace(base, fixup=not base.fixup)]
    for config in dict.fromkeys(configs):  # in order, each once
        if time.perf_counter() > deadline:
            return
        r = {"M": m, **dataclasses.asdict(config)}
        try:
            out = torch.full((m, n), float("nan"), device=device, dtype=x.dtype)
            y = w4a16_matmul(x, qweights[0], scales, None, None, group, out=out, config=config,
                             dequant_min_m=None)  # fmt: skip
            r["rel_err"] = ((y.float() - ref).norm() / ref.norm()).item()
            r["us"] = _timer(lambda c=config: fused(x, c), device, iters) * 1e6
        except Exception as e:  # a config that does not compile or run
            r["error"] = repr(e)[:300]
        yield r


def sweep(shapes: dict, rows: list[int], device, iters: int, budget_s: float) -> list[dict]:
    """Time every candidate config (with the split-sum kernel against the in-kernel fixup
    for the default config) at every row count and shape, most important rows first; each
    config's result is checked against float32."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    weights = {name: _sweep_weights(k, n, device, gen) for name, (k, n) in shapes.items()}
    results = []
    deadline = time.perf_counter() + budget_s
    for m in rows:
        for name, (k, n) in shapes.items():
            for r in _sweep_one(weights[name], m, device, iters, deadline, gen):
                r = {"shape": name, "K": k, "N": n, **r}
                print(json.dumps(r), flush=True)
                results.append(r)
    return results


def install_fastest(results: list[dict]) -> dict:
    """Decide each swept (rows bucket, K, N) from its measurements: the fastest correct
    fused config goes into ``w4a16.TUNED`` for the rest of this run, unless dequantize + mm
    was faster and the bucket is one the launcher may send there (from
    ``UNTUNED_DEQUANT_MIN_M`` rows), in which case the key is removed, as the launcher's
    rule reads an absent key. Prints each decision and the TUNED entries to paste into
    ``kernels/w4a16.py``."""
    from tessera.kernels import w4a16

    fields = list(w4a16.W4Config.__slots__)
    best: dict[tuple[int, int, int], dict] = {}
    dequant: dict[tuple[int, int, int], float] = {}
    for r in results:
        key = (w4a16.rows_bucket(r["M"]), r["K"], r["N"])
        if "us" not in r or key[0] != r["M"]:
            continue
        if r.get("dequant_mm"):
            dequant[key] = r["us"]
        elif r.get("rel_err", 1.0) <= 1e-2 and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    decisions, table, lines = [], {}, []
    for key in sorted(best.keys() | dequant.keys()):
        fused_us = best[key]["us"] if key in best else None
        dequant_us = dequant.get(key)
        config = w4a16.W4Config(**{f: best[key][f] for f in fields}) if key in best else None
        loses = fused_us is None or (dequant_us is not None and dequant_us < fused_us)
        if loses and key[0] >= w4a16.UNTUNED_DEQUANT_MIN_M:
            w4a16.TUNED.pop(key, None)
            winner = "dequant_mm"
        elif config is not None:
            w4a16.TUNED[key] = config
            table[",".join(map(str, key))] = {f: best[key][f] for f in fields}
            lines.append(f"    {key}: {_config_literal(config)},")
            winner = "fused" if not loses else "fused (dequant_mm faster, but too few rows)"
        else:  # under UNTUNED_DEQUANT_MIN_M rows and no fused config ran: leave TUNED be
            winner = "none"
        decisions.append({"M": key[0], "K": key[1], "N": key[2], "fused_us": fused_us,
                          "dequant_mm_us": dequant_us, "winner": winner})  # fmt: skip
        print(json.dumps(decisions[-1] | {"config": _config_literal(config) if config else None}),
              flush=True)  # fmt: skip
    print("TUNED entries (kernels/w4a16.py):\n" + "\n".join(lines), flush=True)
    return {"tuned": table, "decisions": decisions}


def _config_literal(config) -> str:
    """``W4Config(...)`` as it would be written in TUNED: the tile shape, then the fields
    that differ from their defaults."""
    import dataclasses

    head = f"W4Config({config.block_m}, {config.block_n}, {config.block_k}"
    rest = [f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)[3:]
            if getattr(config, f.name) != f.default]  # fmt: skip
    return head + "".join(f", {x}" for x in rest) + ")"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 32, 64, 128, 256, 4096])
    ap.add_argument("--act-order", action="store_true", help="GEMMs with a random perm")
    ap.add_argument("--model", default="random:llama-3.1-8b")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--iters", type=int, default=20, help="GEMM calls per timing")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, interpreted")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--sweep",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first time candidate tile configs for up to SECONDS, then run with the "
        "fastest of each shape and row count (printed as TUNED)",
    )
    ap.add_argument(
        "--sweep-rows",
        type=int,
        nargs="+",
        default=[16, 64, 256, 32, 128],
        help="row counts the sweep times, most important first (a budget cut drops the "
        "last); add 1 to re-sweep the GEMV, 512 for the next bucket",
    )
    args = ap.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        args.rows, args.model, args.batch = [1, 7, 64, 128], "random:smollm2-135m", [1, 2]
        args.context, args.steps, args.iters = 16, 2, 1
    import torch

    torch.set_grad_enabled(False)
    device = torch.device("cpu" if args.dry_run else "cuda")
    result = {
        "date": date.today().isoformat(),
        "device": "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(),
        "argv": sys.argv[1:],
    }
    if not args.dry_run:
        result["copy_bandwidth_GBps"] = copy_bandwidth(device) / 1e9
        print(json.dumps(result), flush=True)
    if args.sweep:
        shapes = TINY if args.dry_run else LLAMA_8B
        rows = args.sweep_rows if not args.dry_run else args.rows
        result["sweep"] = sweep(shapes, rows, device, args.iters, args.sweep)
        result.update(install_fastest(result["sweep"]))
    result["gemm"] = bench_gemm(
        TINY if args.dry_run else LLAMA_8B, args.rows, device, args.act_order, args.iters
    )
    if "copy_bandwidth_GBps" in result:
        for r in result["gemm"]:
            r["fused_weight_bw_vs_copy"] = r["fused_weight_GBps"] / result["copy_bandwidth_GBps"]
            r["fused_TFLOPs_vs_bf16"] = r["fused_TFLOPs"] / r["bf16_TFLOPs"]
            r["dequant_mm_TFLOPs_vs_bf16"] = r["dequant_mm_TFLOPs"] / r["bf16_TFLOPs"]
    _save(result, args.json)  # the GEMMs kept should the decode part not finish
    if not args.skip_decode:
        result["decode"] = bench_decode(args.model, args.batch, args.context, args.steps, device)
        _save(result, args.json)
    print(json.dumps(result, indent=2))


def _save(result: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
