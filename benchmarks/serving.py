"""Serving benchmark: Poisson arrivals through the gRPC API, beside the in-process engine.

Starts `tessera serve` (every process) unless --target is given, replays one workload
at several request rates, and reports output throughput, time to first token (TTFT),
time per output token (TPOT, per request) and inter-token latency (ITL), p50 and p99.
Then the in-process engine (`LLM.generate`) runs the same prompts at saturation, and
the ratio of the served saturation throughput to it says what the process split costs.

    python benchmarks/serving.py --num-requests 32 --rates 1 2 inf
    python benchmarks/serving.py --workload conversational --num-requests 200 \
        --rates 1 4 16 inf --no-in-process       # latency under load (TTFT, TPOT, e2e)

Each rate's p50/p90/p99 of TTFT, TPOT, ITL and end-to-end latency, and the highest
measured rate whose TTFT p99 and TPOT p99 stay under the objectives (--slo-*-ms).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]

from tessera.proto.tessera.v1 import generate_pb2 as pb  # noqa: E402
from tessera.proto.tessera.v1 import generate_pb2_grpc as pb_grpc  # noqa: E402

# The conversational workload (--workload conversational): lengths drawn log-normal, as
# chat traffic is (many short turns, a long tail), and capped. Medians and spreads:
# inputs around 250 tokens up to 2,048, outputs around 200 up to 1,024.
CONVERSATIONAL = {"input": (250, 0.8, 2048), "output": (200, 0.7, 1024)}


def _lognormal(rng: random.Random, median: float, sigma: float, cap: int) -> int:
    return max(4, min(cap, int(round(rng.lognormvariate(math.log(median), sigma)))))


def workload(args) -> list[tuple[list[int], int]]:
    rng = random.Random(args.seed)
    work = []
    for _ in range(args.num_requests):
        if args.workload == "conversational":
            n_in = _lognormal(rng, *CONVERSATIONAL["input"])
            n_out = _lognormal(rng, *CONVERSATIONAL["output"])
        else:
            n_in, n_out = rng.randint(*args.input_len), rng.randint(*args.output_len)
        work.append(([rng.randrange(100, 49152) for _ in range(n_in)], n_out))
    return work


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def one_request(stub, prompt: list[int], max_tokens: int) -> dict:
    req = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=prompt),
        sampling=pb.SamplingParameters(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
    )
    t0 = time.perf_counter()
    stamps: list[float] = []
    async for msg in stub.Generate(req):
        now = time.perf_counter()
        stamps.extend([now] * len(msg.token_ids))
    return {"start": t0, "stamps": stamps}


# Client connections, requests spread round-robin: the gateway caps the streams open on
# one connection (max_streams_per_connection, 256 by default), as a server should.
NUM_CONNECTIONS = 4


def arrival_offsets(num_requests: int, rate: float, seed: int) -> list[float]:
    """Seconds from the start at which each request is sent: Poisson arrivals at
    ``rate`` (all at once for inf), the same for every number of client processes."""
    rng = random.Random(seed)
    offsets, at = [], 0.0
    for _ in range(num_requests):
        offsets.append(at)
        if rate != float("inf"):
            at += rng.expovariate(rate)
    return offsets


async def _send_all(
    target: str, items: list[tuple[int, list[int], int, float]], ready=None
) -> list[tuple[int, dict]]:
    """Send each (index, prompt, max_tokens, offset) at its offset; the results by index.
    ``ready`` (a barrier shared with the other client processes) is passed once every
    connection is up, and the clock starts then."""
    # A local subchannel pool each: channels to one target would share one connection.
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(NUM_CONNECTIONS)
    ]
    try:
        if ready is not None:
            await asyncio.gather(*(ch.channel_ready() for ch in channels))
            await asyncio.to_thread(ready.wait)
        stubs = [pb_grpc.TesseraStub(ch) for ch in channels]
        t_start = time.perf_counter()

        async def at_offset(i: int, prompt: list[int], out_len: int, offset: float) -> dict:
            delay = t_start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            return await one_request(stubs[i % len(stubs)], prompt, out_len)

        results = await asyncio.gather(*(at_offset(*item) for item in items))
    finally:
        for ch in channels:
            await ch.close()
    return [(item[0], r) for item, r in zip(items, results, strict=True)]


def _client_process(target: str, items: list, ready, results) -> None:
    """One client process of several: its share of the requests, on its own event loop
    and connections; the results go back through ``results``."""
    results.put(asyncio.run(_send_all(target, items, ready)))


def run_rate(target: str, work, rate: float, seed: int, processes: int = 1) -> dict:
    """Replay ``work`` at ``rate``: one client process, or ``processes`` of them, each
    sending every processes-th request (a single asyncio process reading every stream
    can be what bounds the measured throughput)."""
    offsets = arrival_offsets(len(work), rate, seed)
    items = [(i, prompt, out_len, offsets[i]) for i, (prompt, out_len) in enumerate(work)]
    if processes <= 1:
        by_index = dict(asyncio.run(_send_all(target, items)))
    else:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # gRPC must not be forked
        ready, queue = ctx.Barrier(processes), ctx.Queue()
        procs = [ctx.Process(target=_client_process, args=(target, items[p::processes],
                                                           ready, queue), daemon=True)
                 for p in range(processes)]  # fmt: skip
        for proc in procs:
            proc.start()
        by_index = {}
        for _ in procs:
            by_index.update(queue.get())
        for proc in procs:
            proc.join()
    results = [by_index[i] for i in range(len(work))]
    t_start = min(r["start"] for r in results)
    wall = max(r["stamps"][-1] if r["stamps"] else r["start"] for r in results) - t_start
    tokens = sum(len(r["stamps"]) for r in results)
    assert tokens == sum(o for _, o in work), "every request must run to max_tokens"
    ttft = [r["stamps"][0] - r["start"] for r in results]
    e2e = [r["stamps"][-1] - r["start"] for r in results]
    tpot = [
        (r["stamps"][-1] - r["stamps"][0]) / (len(r["stamps"]) - 1)
        for r in results
        if len(r["stamps"]) > 1
    ]
    itl = [b - a for r in results for a, b in itertools.pairwise(r["stamps"])]
    ms = 1000.0
    return {
        "rate": "inf" if rate == float("inf") else rate,
        "client_processes": processes,
        "seconds": wall,
        "output_tok_per_s": tokens / wall,
        **{
            f"{name}_ms": {f"p{q}": pct(values, q) * ms for q in (50, 90, 99)}
            for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e", e2e))
        },
    }


def within_slo(served: list[dict], ttft_ms: float, tpot_ms: float) -> float | str | None:
    """The highest measured rate whose TTFT p99 and TPOT p99 are under the objectives."""
    ok = [
        s["rate"] for s in served
        if s["ttft_ms"]["p99"] < ttft_ms and s["tpot_ms"]["p99"] < tpot_ms
    ]  # fmt: skip
    return max(ok, key=lambda r: float(r)) if ok else None


def start_server(args, extra: list[str] = ()) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, TESSERA_LOG_LEVEL="WARNING")
    # gRPC only: the HTTP port stays off so a second run cannot collide on 8000.
    cmd = [sys.executable, "-P", "-m", "tessera", "serve", "--port", str(port), "--http-port", "0"]
    cmd += ["--model", args.model, "--device", args.device]
    if args.model.startswith("random:"):
        cmd += ["--num-tokenizers", "0"]  # random weights: token ids in and out
    if getattr(args, "num_gateways", 1) > 1:  # (other benchmarks start servers too)
        cmd += ["--num-gateways", str(args.num_gateways)]
    cmd += list(extra)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    target = f"127.0.0.1:{port}"
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {proc.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return proc, target
            except grpc.RpcError:
                time.sleep(0.5)
    proc.kill()
    raise TimeoutError("server did not start")


def in_process(args, work) -> dict:
    from tessera import LLM, SamplingParams

    llm = LLM(args.model, device=args.device, show_progress=False)
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for _, o in work]
    # Warm-up: the whole workload once (every batch shape the timed run meets), or a
    # single request with --warmup short.
    warm = work if args.warmup == "full" else work[:1]
    llm.generate([p for p, _ in warm], params[: len(warm)], use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate([p for p, _ in work], params, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    # Give the device memory back before the next server starts in its own processes.
    del llm, outs
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"seconds": wall, "output_tok_per_s": tokens / wall}


def serve_rates(args, work, rates: list[float], extra: list[str] = ()) -> list[dict]:
    """Start the server (unless --target), replay the workload at each rate, stop it."""
    proc, target = (None, args.target) if args.target else start_server(args, extra)
    try:
        warm = work if args.warmup == "full" else work[:2]  # as in in_process
        run_rate(target, warm, float("inf"), args.seed, args.client_processes)
        return [run_rate(target, work, r, args.seed, args.client_processes) for r in rates]
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="auto")
    p.add_argument("--target", default=None, help="a running server; else one is started")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument(
        "--workload",
        choices=("uniform", "conversational"),
        default="uniform",
        help="uniform: lengths from --input-len/--output-len; conversational: log-normal "
        "lengths (inputs ~250 up to 2,048 tokens, outputs ~200 up to 1,024)",
    )
    p.add_argument("--input-len", type=int, nargs=2, default=(32, 256))
    p.add_argument("--output-len", type=int, nargs=2, default=(16, 64))
    p.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0, float("inf")])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of (in-process, served at saturation), alternating, for medians",
    )
    p.add_argument(
        "--warmup",
        choices=("full", "short"),
        default="full",
        help="untimed pass before timing: the whole workload (full) or one request",
    )
    p.add_argument(
        "--sync-too",
        action="store_true",
        help="also serve at saturation with --no-async-scheduling, --repeat times",
    )
    p.add_argument(
        "--num-gateways",
        type=int,
        default=1,
        help="gateway processes sharing the server's ports (tessera serve --num-gateways)",
    )
    p.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="client processes sharing the requests (each its own event loop and "
        f"{NUM_CONNECTIONS} connections), so that reading the streams does not bound "
        "the measurement",
    )
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0, help="TTFT p99 objective")
    p.add_argument("--slo-tpot-ms", type=float, default=50.0, help="TPOT p99 objective")
    p.add_argument(
        "--no-in-process",
        action="store_true",
        help="serve only: skip the in-process engine (latency runs)",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args()
    work = workload(args)
    served = serve_rates(args, work, args.rates)
    result = {
        "date": date.today().isoformat(),
        "model": args.model,
        "device": args.device,
        "num_requests": args.num_requests,
        "workload": args.workload,
        "input_len": list(args.input_len),
        "output_len": list(args.output_len),
        "mean_input_len": statistics.mean(len(p) for p, _ in work),
        "mean_output_len": statistics.mean(o for _, o in work),
        "seed": args.seed,
        "client_processes": args.client_processes,
        "num_gateways": args.num_gateways,
        "served": served,
        "slo": {"ttft_p99_ms": args.slo_ttft_ms, "tpot_p99_ms": args.slo_tpot_ms,
                "max_rate_within": within_slo(served, args.slo_ttft_ms, args.slo_tpot_ms)},
    }
    if args.no_in_process:
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return
    result["in_process"] = in_process(args, work)
    # Machine drift between the two halves can swamp the difference: repeat both,
    # alternating which goes first, and compare medians.
    saturated = [max(s["output_tok_per_s"] for s in served)]
    local = [result["in_process"]["output_tok_per_s"]]
    for i in range(1, args.repeat):
        first_local = i % 2 == 1
        if first_local:
            local.append(in_process(args, work)["output_tok_per_s"])
        saturated.append(serve_rates(args, work, [float("inf")])[0]["output_tok_per_s"])
        if not first_local:
            local.append(in_process(args, work)["output_tok_per_s"])
    if args.sync_too:  # the served engine with async scheduling off, at saturation
        result["saturated_sync_runs"] = [
            serve_rates(args, work, [float("inf")], ["--no-async-scheduling"])[0][
                "output_tok_per_s"
            ]
            for _ in range(args.repeat)
        ]
        result["async_over_sync_served"] = statistics.median(saturated) / statistics.median(
            result["saturated_sync_runs"]
        )
    result["saturated_runs"] = saturated
    result["in_process_runs"] = local
    result["served_over_in_process"] = statistics.median(saturated) / statistics.median(local)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
