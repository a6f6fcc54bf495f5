"""Prefix caching, on against off, through the served gRPC API in one run.

Each mode starts its own `tessera serve` (`--no-enable-prefix-caching` for off), warms it
on prompts that share nothing with the measured ones, and replays every workload; with
the cache on, `ResetPrefixCache` runs before each workload so that one cannot seed the
next. Greedy, ``ignore_eos``: every request runs to its own ``max_tokens``.

Workloads (token-id prompts drawn with a fixed seed):

    shared G P S Q O   G groups of P prompts; a group's prompts share an S-token system
                       prompt and differ in a Q-token question; O tokens out. All sent
                       at once (SGLang's generated-shared-prefix workload is 64 16 2048
                       128 256).
    multiturn C T U O  C conversations of T turns, run concurrently, each turn sent when
                       the previous one's answer is back: the prompt is the conversation
                       so far (every earlier question and answer) plus a new U-token
                       question; O tokens out per turn.
    random N I O       N prompts of I tokens sharing nothing; O tokens out (the cost of
                       the cache at a 0% hit rate).

Reported per workload and mode: output tokens/s, TTFT p50/p99 (ms), and the prompt
tokens the cache served (`Usage.cached_tokens`) over all prompt tokens.

    python benchmarks/prefix_cache.py --device cpu --shared 1 64 1024 32 64 \\
        --multiturn 16 6 64 32 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import NUM_CONNECTIONS, pct, start_server  # noqa: E402

from tessera.proto.tessera.v1 import generate_pb2 as pb  # noqa: E402
from tessera.proto.tessera.v1 import generate_pb2_grpc as pb_grpc  # noqa: E402

LOW, HIGH = 100, 49152  # token ids drawn from this range: inside every model's vocabulary


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(LOW, HIGH) for _ in range(n)]


async def one(stub, prompt: list[int], max_tokens: int) -> dict:
    req = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=prompt),
        sampling=pb.SamplingParameters(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
    )
    t0 = time.perf_counter()
    first = None
    out: list[int] = []
    cached = 0
    async for msg in stub.Generate(req):
        if msg.token_ids and first is None:
            first = time.perf_counter()
        out.extend(msg.token_ids)
        if msg.HasField("usage"):
            cached = msg.usage.cached_tokens
    assert len(out) == max_tokens, "every request must run to max_tokens"
    return {"ttft": first - t0, "out": out, "prompt": len(prompt), "cached": cached}


def summary(results: list[dict], wall: float) -> dict:
    ttft = [r["ttft"] for r in results]
    prompt = sum(r["prompt"] for r in results)
    return {
        "requests": len(results),
        "seconds": wall,
        "output_tok_per_s": sum(len(r["out"]) for r in results) / wall,
        "ttft_ms": {"p50": pct(ttft, 50) * 1e3, "p99": pct(ttft, 99) * 1e3},
        "prompt_tokens": prompt,
        "cached_tokens": sum(r["cached"] for r in results),
        "hit_rate": sum(r["cached"] for r in results) / prompt,
    }


async def run_batch(stubs, work: list[tuple[list[int], int]]) -> dict:
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(one(stubs[i % len(stubs)], p, o) for i, (p, o) in enumerate(work))
    )
    return summary(list(results), time.perf_counter() - t0)


async def run_multiturn(stubs, conversations: int, turns: int, user: int, out: int,
                        seed: int) -> dict:
    async def conversation(c: int) -> list[dict]:
        rng = random.Random(seed * 1000 + c)
        history: list[int] = []
        done = []
        for _ in range(turns):
            prompt = history + tokens(rng, user)
            r = await one(stubs[c % len(stubs)], prompt, out)
            history = prompt + r["out"]
            done.append(r)
        return done

    t0 = time.perf_counter()
    per = await asyncio.gather(*(conversation(c) for c in range(conversations)))
    return summary([r for conv in per for r in conv], time.perf_counter() - t0)


def shared_work(g: int, p: int, s: int, q: int, o: int, seed: int):
    rng = random.Random(seed)
    work = []
    for _ in range(g):
        system = tokens(rng, s)
        work += [(system + tokens(rng, q), o) for _ in range(p)]
    rng.shuffle(work)  # groups interleave, as independent clients would
    return work


async def run_mode(target: str, args, cache_on: bool) -> dict:
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(NUM_CONNECTIONS)
    ]
    try:
        stubs = [pb_grpc.TesseraStub(ch) for ch in channels]
        warm_rng = random.Random(args.seed + 7)  # shares nothing with the measured prompts
        await run_batch(stubs, [(tokens(warm_rng, 256), 16) for _ in range(8)])
        out = {}

        async def fresh() -> None:
            if cache_on:
                await stubs[0].ResetPrefixCache(pb.ResetPrefixCacheRequest())

        if args.shared:
            await fresh()
            out["shared"] = await run_batch(stubs, shared_work(*args.shared, args.seed))
        if args.multiturn:
            await fresh()
            out["multiturn"] = await run_multiturn(stubs, *args.multiturn, args.seed)
        if args.random:
            n, i, o = args.random
            rng = random.Random(args.seed + 1)
            await fresh()
            out["random"] = await run_batch(stubs, [(tokens(rng, i), o) for _ in range(n)])
        return out
    finally:
        for ch in channels:
            await ch.close()


def serve_mode(args, cache_on: bool) -> dict:
    extra = ["--max-model-len", str(args.max_model_len)] if args.max_model_len else []
    if not cache_on:
        extra.append("--no-enable-prefix-caching")
    proc, target = start_server(args, extra + args.server_args)
    try:
        return asyncio.run(run_mode(target, args, cache_on))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="auto")
    p.add_argument("--shared", type=int, nargs=5, metavar=("G", "P", "S", "Q", "O"))
    p.add_argument("--multiturn", type=int, nargs=4, metavar=("C", "T", "U", "O"))
    p.add_argument("--random", type=int, nargs=3, metavar=("N", "I", "O"))
    p.add_argument("--repeat", type=int, default=1, help="rounds of (off, on), alternating")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                   help="passed to tessera serve as they are (last)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    args.target = None
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for i in range(args.repeat):
        order = ("off", "on") if i % 2 == 0 else ("on", "off")
        for mode in order:
            runs[mode].append(serve_mode(args, mode == "on"))
            print(mode, json.dumps(runs[mode][-1]), flush=True)
    ratios = {}
    for name in runs["on"][0]:
        on = [r[name] for r in runs["on"]]
        off = [r[name] for r in runs["off"]]
        med = lambda rs, f: statistics.median(f(r) for r in rs)  # noqa: E731
        ratios[name] = {
            "throughput_on_over_off": med(on, lambda r: r["output_tok_per_s"])
            / med(off, lambda r: r["output_tok_per_s"]),
            "ttft_p50_off_over_on": med(off, lambda r: r["ttft_ms"]["p50"])
            / med(on, lambda r: r["ttft_ms"]["p50"]),
            "ttft_p99_off_over_on": med(off, lambda r: r["ttft_ms"]["p99"])
            / med(on, lambda r: r["ttft_ms"]["p99"]),
        }
    result = {
        "date": date.today().isoformat(),
        "model": args.model,
        "device": args.device,
        "command": " ".join(sys.argv),
        "workloads": {"shared": args.shared, "multiturn": args.multiturn,
                      "random": args.random},
        "runs": runs,
        "ratios": ratios,
    }
    try:
        import torch

        if torch.cuda.is_available():
            result["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    print(json.dumps(ratios, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
