"""Soak run (issue 5): sustained load on `tessera serve`, with random cancellations and an
executor killed every minute. Not a test: it reports, and exits 1 if a request was lost.

Starts every process on this machine, then for ``--minutes`` keeps ``--concurrency``
gRPC streams busy: text prompts, 8..64 output tokens (``ignore_eos``, so the length is
known), greedy or seeded sampling, and a share of them cancelled after a few tokens. Every
``--kill-every`` seconds the executor is SIGKILLed; the scheduler restarts it and
recomputes what ran, so streams should go on. Each request ends as one of:

    served      all its tokens, status OK
    cancelled   we cancelled it (the server aborts it and frees its blocks)
    failed      an error status (UNAVAILABLE, RESOURCE_EXHAUSTED ...), counted by code
    lost        no end within --request-timeout, or OK with the wrong number of tokens

Greedy outputs of one prompt must agree (the shorter a prefix of the longer), across
kills too: disagreements are counted as mismatched. Resident memory (VmRSS from /proc)
of every Tessera process is sampled at the start, every minute (half a minute after each
kill, so the executor is loaded), and at the end. At the end the KV pool must be whole
and, after SIGTERM, every process gone.

    PYTHONPATH=. .venv/bin/python benchmarks/soak.py --minutes 10 \\
        --json benchmarks/results/soak_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]

from tessera.proto.tessera.v1 import generate_pb2 as pb  # noqa: E402
from tessera.proto.tessera.v1 import generate_pb2_grpc as pb_grpc  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "def quicksort(arr):",
    "Once upon a time in a land far away, there lived",
    "Write a list of five fruits:\n1.",
    "The quick brown fox",
    "In 1969, the first humans",
    "Explain in two sentences why the sky is blue.",
    "Translate to French: I would like a cup of coffee.",
    "A haiku about the sea:",
    "The three laws of thermodynamics are",
    "SELECT name, count(*) FROM users",
    "Dear hiring manager,",
]
ROLES = ("tokenizer_svc", "scheduler", "executor", "services")


# -- processes --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def role(pid: int) -> str:
    try:
        line = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "gone"
    return next((r for r in ROLES if f"-m tessera.{r} " in line + " "), "other")


def rss_mib(launcher: int) -> dict[str, float]:
    """Resident memory of every Tessera process, summed by role (MiB)."""
    out: dict[str, float] = {}
    for pid in [launcher, *descendants(launcher)]:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        kib = next((int(line.split()[1]) for line in status.splitlines()
                    if line.startswith("VmRSS:")), 0)  # fmt: skip
        name = "launcher" if pid == launcher else role(pid)
        out[name] = round(out.get(name, 0.0) + kib / 1024, 1)
    out["total"] = round(sum(out.values()), 1)
    return out


def executor_pid(launcher: int) -> int | None:
    return next((p for p in descendants(launcher) if role(p) == "executor" and alive(p)), None)


def start_server(args, run_dir: str, log) -> tuple[subprocess.Popen, str, str]:
    port, http_port = free_port(), free_port()
    cmd = [sys.executable, "-P", "-m", "tessera", "serve", "--model", args.model, "--device", "cpu",
           "--port", str(port), "--http-port", str(http_port), "--num-tokenizers", "2",
           "--run-dir", run_dir, "--max-num-seqs", str(args.max_num_seqs)]  # fmt: skip
    env = {**os.environ, "TESSERA_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return proc, target, f"http://127.0.0.1:{http_port}"
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise TimeoutError("the server did not become healthy")


# -- load -----------------------------------------------------------------------------------------


@dataclass
class Tally:
    served: int = 0
    cancelled: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    mismatched: int = 0
    tokens: int = 0
    latencies: list[float] = field(default_factory=list)  # served requests, end to end
    ttfts: list[float] = field(default_factory=list)
    lost_examples: list[str] = field(default_factory=list)


class Load:
    def __init__(self, args, target: str) -> None:
        self.args = args
        self.target = target
        self.rng = random.Random(args.seed)
        self.tally = Tally()
        self.greedy: dict[tuple[str, bool], list[int]] = {}  # (prompt, chat) -> longest seen

    def _request(self) -> tuple[pb.GenerateRequest, int, int | None, tuple[str, bool] | None]:
        rng = self.rng
        prompt = rng.choice(PROMPTS)
        max_tokens = rng.randint(8, 64)
        greedy = rng.random() < 0.7
        sampling = pb.SamplingParameters(
            temperature=0.0 if greedy else 0.8, max_tokens=max_tokens, ignore_eos=True
        )
        if not greedy:
            sampling.seed = rng.randrange(1 << 32)
        chat = rng.random() < 0.3
        if chat:
            req = pb.GenerateRequest(
                chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=prompt)]),
                sampling=sampling,
            )
        else:
            req = pb.GenerateRequest(text=prompt, sampling=sampling)
        cancel_after = rng.randint(1, max_tokens - 1) if rng.random() < self.args.cancel else None
        return req, max_tokens, cancel_after, (prompt, chat) if greedy else None

    async def one(self, stub) -> None:
        req, max_tokens, cancel_after, greedy_key = self._request()
        tally = self.tally
        started = time.monotonic()
        first = None
        tokens: list[int] = []
        call = stub.Generate(req, timeout=self.args.request_timeout)
        try:
            async for msg in call:
                if msg.token_ids and first is None:
                    first = time.monotonic()
                tokens.extend(msg.token_ids)
                if cancel_after is not None and len(tokens) >= cancel_after:
                    call.cancel()
                    tally.cancelled += 1
                    return
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                tally.lost += 1
                tally.lost_examples.append(f"no end in {self.args.request_timeout}s")
            else:
                tally.failed[e.code().name] = tally.failed.get(e.code().name, 0) + 1
            return
        if len(tokens) != max_tokens:
            tally.lost += 1
            tally.lost_examples.append(f"OK with {len(tokens)} of {max_tokens} tokens")
            return
        tally.served += 1
        tally.tokens += len(tokens)
        tally.latencies.append(time.monotonic() - started)
        tally.ttfts.append((first or time.monotonic()) - started)
        if greedy_key is not None:
            seen = self.greedy.get(greedy_key, [])
            short, long = sorted((seen, tokens), key=len)
            if long[: len(short)] != short:
                tally.mismatched += 1
            elif len(tokens) > len(seen):
                self.greedy[greedy_key] = tokens

    async def worker(self, stop_at: float) -> None:
        async with grpc.aio.insecure_channel(self.target) as ch:
            stub = pb_grpc.TesseraStub(ch)
            while time.monotonic() < stop_at:
                await self.one(stub)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))], 3)


async def soak(args, launcher: int, target: str, http_url: str) -> dict:
    load = Load(args, target)
    started = time.monotonic()
    stop_at = started + args.minutes * 60
    rss = [{"t": 0, **rss_mib(launcher)}]
    kills: list[dict] = []

    async def killer() -> None:
        next_kill = started + args.kill_every
        next_sample = started + 30  # between kills: a sample sees a loaded executor
        while time.monotonic() < stop_at:
            now = time.monotonic()
            if args.kill_every and now >= next_kill:
                pid = executor_pid(launcher)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    kills.append({"t": round(now - started, 1), "pid": pid})
                    print(f"[{now - started:6.0f}s] killed executor {pid}", flush=True)
                next_kill += args.kill_every
            if now >= next_sample:
                rss.append({"t": round(now - started), **rss_mib(launcher)})
                t = load.tally
                print(f"[{now - started:6.0f}s] served {t.served} cancelled {t.cancelled} "
                      f"failed {sum(t.failed.values())} lost {t.lost} "
                      f"rss {rss[-1]['total']} MiB", flush=True)  # fmt: skip
                next_sample += 60
            await asyncio.sleep(0.2)

    await asyncio.gather(killer(), *(load.worker(stop_at) for _ in range(args.concurrency)))
    elapsed = time.monotonic() - started
    rss.append({"t": round(elapsed), **rss_mib(launcher)})
    t = load.tally
    return {
        "elapsed_s": round(elapsed, 1),
        "requests": {"served": t.served, "cancelled": t.cancelled, "failed": t.failed,
                     "lost": t.lost, "greedy_mismatched": t.mismatched},  # fmt: skip
        "lost_examples": t.lost_examples[:10],
        "output_tokens_served": t.tokens,
        "output_tok_per_s": round(t.tokens / elapsed, 1),
        "latency_s": {"p50": pct(t.latencies, 50), "p99": pct(t.latencies, 99),
                      "max": pct(t.latencies, 100)},  # fmt: skip
        "ttft_s": {"p50": pct(t.ttfts, 50), "p99": pct(t.ttfts, 99)},
        "executor_kills": kills,
        "rss_mib": {"start": rss[0], "end": rss[-1], "samples": rss},
    }


def pool_whole(target: str, timeout: float = 60.0) -> dict:
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.TesseraStub(ch)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        deadline = time.monotonic() + timeout
        while True:
            load = stub.GetLoad(pb.GetLoadRequest(), timeout=10)
            if load.num_kv_blocks_free == info.num_kv_blocks or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    return {"num_kv_blocks": info.num_kv_blocks, "free": load.num_kv_blocks_free,
            "used": load.num_kv_blocks_used, "running": load.num_running,
            "waiting": load.num_waiting, "whole": load.num_kv_blocks_free == info.num_kv_blocks}


def counter(http_url: str, name: str) -> float | None:
    for line in httpx.get(f"{http_url}/metrics", timeout=10).text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8, help="streams kept open")
    parser.add_argument("--kill-every", type=float, default=60.0,
                        help="seconds between executor kills; 0: none")
    parser.add_argument("--cancel", type=float, default=0.1, help="share of requests cancelled")
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    run_dir = tempfile.mkdtemp(prefix="tessera-soak-")
    log_path = Path(run_dir) / "server.log"
    with open(log_path, "wb") as log:
        proc, target, http_url = start_server(args, run_dir, log)
    launcher = proc.pid
    try:
        result = asyncio.run(soak(args, launcher, target, http_url))
        result["pool_at_end"] = pool_whole(target)
        result["executor_restarts"] = counter(http_url, "tessera_engine_executor_restarts_total")
    finally:
        everyone = descendants(launcher)
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        deadline = time.monotonic() + 15
        while any(alive(p) for p in everyone) and time.monotonic() < deadline:
            time.sleep(0.2)
    result["shutdown"] = {"launcher_exit_code": code,
                          "left_behind": [p for p in everyone if alive(p)]}  # fmt: skip
    result["config"] = {**vars(args), "date": date.today().isoformat(), "cpus": os.cpu_count()}
    log_text = log_path.read_text(errors="replace")
    errors = [line for line in log_text.splitlines() if " ERROR " in line]
    result["server_log_errors"] = {"count": len(errors), "first": errors[:12]}
    print(json.dumps({k: v for k, v in result.items() if k != "rss_mib"}, indent=1))
    print("rss MiB start:", result["rss_mib"]["start"])
    print("rss MiB end:  ", result["rss_mib"]["end"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    ok = (result["requests"]["lost"] == 0 and result["pool_at_end"]["whole"]
          and not result["shutdown"]["left_behind"])  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
