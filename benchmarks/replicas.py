"""Engine replicas behind one gateway (issue 17): one replica against two, and two with
``cache_aware`` against ``round_robin`` routing, on the shared-prefix workload of
benchmarks/prefix_cache.py, in one run.

Each mode starts its own `tessera serve --replicas N --routing-policy P`, waits until
every replica serves (GetLoad), warms it on prompts that share nothing with the measured
ones, resets the prefix caches and sends the whole workload at once. Greedy,
``ignore_eos``. Reported per mode: output tokens/s, TTFT p50/p99, the prompt tokens the
caches served (``Usage.cached_tokens``) over all prompt tokens, and the requests each
replica got. Modes run in rounds, alternating their order (``--repeat``).

    python benchmarks/replicas.py --device cpu --shared 8 8 512 32 32 --json out.json

``--scale 1 2 4 8`` runs K replicas with ``cache_aware`` routing instead, each K in
turn (one GPU each: every replica gets its own devices), and reports each K's
throughput over K times one replica's (issue 21's scaling target: at least 0.9).
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
from prefix_cache import run_batch, shared_work, tokens  # noqa: E402
from serving import NUM_CONNECTIONS, start_server  # noqa: E402

from tessera.proto.tessera.v1 import generate_pb2 as pb  # noqa: E402
from tessera.proto.tessera.v1 import generate_pb2_grpc as pb_grpc  # noqa: E402

MODES = {  # name: (replicas, routing policy)
    "1 replica": (1, "cache_aware"),
    "2 replicas cache_aware": (2, "cache_aware"),
    "2 replicas round_robin": (2, "round_robin"),
}


async def run_mode(target: str, args, replicas: int = 1) -> dict:
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(NUM_CONNECTIONS)
    ]
    try:
        stubs = [pb_grpc.TesseraStub(ch) for ch in channels]
        deadline = time.monotonic() + 300
        while not all(r.serving for r in (await stubs[0].GetLoad(pb.GetLoadRequest())).replicas):
            assert time.monotonic() < deadline, "the replicas did not come up"
            await asyncio.sleep(0.5)
        warm_rng = random.Random(args.seed + 7)  # shares nothing with the measured prompts
        # Enough for every replica to get some (routing spreads prompts that share nothing).
        num_warm = max(8, 4 * replicas)
        await run_batch(stubs, [(tokens(warm_rng, 256), 16) for _ in range(num_warm)])
        await stubs[0].ResetPrefixCache(pb.ResetPrefixCacheRequest())
        before = [r.num_routed for r in (await stubs[0].GetLoad(pb.GetLoadRequest())).replicas]
        out = await run_batch(stubs, shared_work(*args.shared, args.seed))
        after = [r.num_routed for r in (await stubs[0].GetLoad(pb.GetLoadRequest())).replicas]
        out["requests_per_replica"] = [a - b for a, b in zip(after, before, strict=True)]
        return out
    finally:
        for ch in channels:
            await ch.close()


def serve_mode(args, replicas: int, policy: str) -> dict:
    extra = ["--replicas", str(replicas), "--routing-policy", policy]
    proc, target = start_server(args, extra + args.server_args)
    try:
        return asyncio.run(run_mode(target, args, replicas))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="auto")
    p.add_argument("--shared", type=int, nargs=5, metavar=("G", "P", "S", "Q", "O"),
                   default=[8, 8, 512, 32, 32])
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                   help="passed to tessera serve as they are (last)")
    p.add_argument("--scale", type=int, nargs="+", metavar="K",
                   help="K replicas, cache_aware, for each K (1 first: the base of the "
                   "scaling ratios), instead of the three default modes")  # fmt: skip
    p.add_argument("--json", default=None)
    args = p.parse_args()
    modes = MODES
    if args.scale:
        ks = sorted(set(args.scale) | {1})
        modes = {f"{k} replica{'s' if k > 1 else ''} cache_aware": (k, "cache_aware") for k in ks}
    runs: dict[str, list[dict]] = {name: [] for name in modes}
    for i in range(args.repeat):
        names = list(modes) if i % 2 == 0 else list(reversed(modes))
        for name in names:
            runs[name].append(serve_mode(args, *modes[name]))
            r = runs[name][-1]
            print(f"{name}: {r['output_tok_per_s']:.1f} tok/s, hit rate {r['hit_rate']:.2f}, "
                  f"TTFT p50 {r['ttft_ms']['p50']:.0f} ms, per replica "
                  f"{r['requests_per_replica']}", flush=True)
    med = {name: {k: statistics.median(r[k] for r in rs)
                  for k in ("output_tok_per_s", "hit_rate")}
           for name, rs in runs.items()}  # fmt: skip
    if args.scale:  # K replicas against K times one
        one = next(m for name, m in med.items() if modes[name][0] == 1)["output_tok_per_s"]
        for name, m in med.items():
            m["over_k_times_one"] = m["output_tok_per_s"] / (modes[name][0] * one)
    result = {
        "date": date.today().isoformat(),
        "model": args.model,
        "device": args.device,
        "command": " ".join(sys.argv),
        "workload": {"shared": args.shared},
        "runs": runs,
        "median": med,
    }
    print(json.dumps(med, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
