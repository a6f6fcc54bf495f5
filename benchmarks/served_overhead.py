"""Served host overhead: each process's CPU time per output token (issue 22, item 4).

The served stack at saturation with the device taken out: the real gateway and the real
scheduler processes, started as `tessera serve` starts them (each gateway of several with
``--reuse-port``) but with only the flags this needs, so that an older commit's tree
runs them too (``--baseline``), and a mirror executor in
place of the model (no torch: it applies the mirror rule and answers each plan after
``--step-ms``, with plausible tokens). ``serving.py``'s gRPC client replays its workload
at saturation against the gateway, as in the GPU measurement of served against
in-process throughput (random:llama-3.2-1b: token ids in and out, no tokenizers).

    client (serving.py's run_rate) ──gRPC──► gateway ──ZeroMQ──► scheduler ──► mirror

Measured over each timed pass: every process's CPU seconds (utime + stime from
/proc/PID/stat: every thread, gRPC's and ZeroMQ's included), divided by the output
tokens streamed; and the throughput. A process's microseconds per token bound what one
of it can stream: 1e6 / us_per_token tokens a second with a whole core to itself. The
process with the largest is the one that holds a served engine below its device's pace
once the device is fast enough (the 1B shape at 256 sequences on an H100: about 37k
output tokens a second in-process).

    .venv/bin/python benchmarks/served_overhead.py --repeats 3

With ``--step-ms 0`` (the default) the mirror answers at once: every process runs as
fast as the others let it, and the 2-core machine is shared, so read the per-token CPU
times, not the throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import serving  # noqa: E402  (the client and the workload of the GPU measurement)

MODEL = "random:llama-3.2-1b"
BLOCK_SIZE = 16
EOS = 2  # never sampled by the mirror (host_overhead.mirror_step: ids from 100)


# -- the mirror executor ------------------------------------------------------------


def run_mirror(
    address: str,
    vocab_size: int,
    num_kv_blocks: int,
    max_model_len: int,
    step_ms: float,
    counts_path: str,
) -> None:
    """Connect to the scheduler's executor socket and answer plans until killed; keep
    the steps answered and the tokens sampled in ``counts_path`` (two int64s)."""
    import mmap

    import zmq
    from host_overhead import mirror_step

    from tessera.common import wire
    from tessera.common.plan import StepResult
    from tessera.proto.tessera.v1 import engine_pb2 as pb

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(address)
    info = pb.EngineInfo(model=MODEL, max_model_len=max_model_len, vocab_size=vocab_size,
                         block_size=BLOCK_SIZE, num_kv_blocks=num_kv_blocks,
                         eos_token_ids=[EOS])  # fmt: skip
    sock.send(wire.encode(pb.ExecutorReady(info=info, max_position_embeddings=max_model_len)))
    mirrors: dict[str, list[int]] = {}  # mirror_step's
    with open(counts_path, "r+b") as f:
        counts = mmap.mmap(f.fileno(), 16)
    num_steps = num_sampled = 0
    while True:
        pb_plan = wire.decode(pb.StepPlan, sock.recv())
        started = time.perf_counter()
        sampled = mirror_step(wire.plan_from_pb(pb_plan), mirrors, vocab_size)
        num_steps += 1
        num_sampled += len(sampled)
        counts[:16] = struct.pack("<qq", num_steps, num_sampled)
        if step_ms > 0:  # the device's time, if asked for
            time.sleep(max(0.0, step_ms / 1e3 - (time.perf_counter() - started)))
        sock.send(wire.encode(wire.result_to_pb(StepResult(sampled_token_ids=sampled),
                                                pb_plan.step_id)))  # fmt: skip


def pool_size(args: argparse.Namespace) -> tuple[int, int]:
    """(max_model_len, KV blocks) for the workload's longest request, twice over the
    running sequences' need: the mirror's pool, and the in-process bound's."""
    max_model_len = args.input_len[1] + args.output_len[1] + BLOCK_SIZE
    return max_model_len, args.max_num_seqs * (max_model_len // BLOCK_SIZE + 1) * 2


def cpu_seconds(pid: int) -> float:
    """A process's CPU seconds so far: every thread, user and system (/proc, in clock
    ticks of 10 ms)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def ideal_steps(work: list, args: argparse.Namespace) -> int:
    """The steps the scheduler alone takes for ``work``, every request there at once (in
    the workload's order), one step at a time against a perfect executor: the in-process
    engine at the mirror's pace takes ``steps * step_ms``, what the served stack is
    compared with (as serving.py compares it with ``LLM.generate``). Not a strict bound:
    served requests arrive in another order, which FCFS packs a little differently."""
    from tessera.common.plan import SamplingOptions, StepResult, StopConditions
    from tessera.scheduler import Scheduler
    from tessera.scheduler.config import SchedulerConfig
    from tessera.scheduler.request import Request

    max_model_len, num_blocks = pool_size(args)
    scheduler = Scheduler(SchedulerConfig(
        num_blocks=num_blocks,
        block_size=BLOCK_SIZE, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=max_model_len,
    ))  # fmt: skip
    for i, (prompt, max_tokens) in enumerate(work):
        scheduler.add_request(
            Request(
                f"ideal-{i}",
                list(prompt),
                SamplingOptions(),
                StopConditions(max_tokens=max_tokens, ignore_eos=True),
            )
        )
    steps = 0
    while scheduler.has_unfinished_requests():
        plan = scheduler.schedule()
        steps += 1
        scheduler.update_from_result(
            plan, StepResult(sampled_token_ids=dict.fromkeys(plan.sampling, 100))
        )
    return steps


# -- the stack ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """Scheduler, mirror and gateway, each its own process; stopped on exit."""

    def __init__(self, args: argparse.Namespace, pythonpath: Path | None = None) -> None:
        self.run_dir = tempfile.mkdtemp(prefix="tessera-served-bench-")
        self.port = _free_port()
        sched = f"ipc://{self.run_dir}/scheduler.sock"
        execu = f"ipc://{self.run_dir}/executor.sock"
        py = [sys.executable, "-P"]
        env = dict(os.environ, TESSERA_LOG_LEVEL="WARNING")
        if pythonpath is not None:  # a baseline's tree (host_overhead.baseline_tree)
            env["PYTHONPATH"] = str(pythonpath)
        max_model_len, num_kv_blocks = pool_size(args)
        self.counts_path = f"{self.run_dir}/mirror.counts"
        Path(self.counts_path).write_bytes(bytes(16))
        self.procs: dict[str, subprocess.Popen] = {}
        self.procs["scheduler"] = subprocess.Popen(
            py + ["-m", "tessera.scheduler", "--model", MODEL, "--device", "cpu",
                  "--gateway-address", sched, "--executor-address", execu,
                  "--no-start-executor", "--step-timeout", "none",
                  "--max-num-seqs", str(args.max_num_seqs),
                  "--max-num-batched-tokens", str(args.max_num_batched_tokens)],
            env=env,
        )  # fmt: skip
        self.procs["mirror"] = subprocess.Popen(
            py + [__file__, "--mirror", execu, str(args.vocab_size), str(num_kv_blocks),
                  str(max_model_len), str(args.step_ms), self.counts_path],
            env=env,
        )  # fmt: skip
        gateway = py + ["-m", "tessera.services", "--model", MODEL, "--port", str(self.port),
                        "--http-port", "0", "--scheduler-address", sched,
                        "--tokenizer-addresses", ""]  # fmt: skip
        if args.num_gateways == 1:
            self.procs["gateway"] = subprocess.Popen(gateway, env=env)
        else:  # named and sharing the port as tessera serve's
            for g in range(args.num_gateways):
                self.procs[f"gateway-{g}"] = subprocess.Popen([*gateway, "--reuse-port"], env=env)
        self.target = f"127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float = 120.0) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                for name, proc in self.procs.items():
                    if proc.poll() is not None:
                        raise RuntimeError(f"{name} exited with code {proc.returncode}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        return
                except grpc.RpcError:
                    time.sleep(0.2)
        raise TimeoutError("the stack did not become healthy")

    def cpu_seconds(self) -> dict[str, float]:
        """Each process's CPU seconds so far."""
        return {name: cpu_seconds(proc.pid) for name, proc in self.procs.items()}

    def steps(self) -> tuple[int, int]:
        """The mirror's steps answered and tokens sampled so far."""
        return struct.unpack("<qq", Path(self.counts_path).read_bytes()[:16])

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.run_dir, ignore_errors=True)


def _client_cpu() -> float:
    """CPU seconds of this process and of its client processes that have ended."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def timed_pass(stack: Stack, work: list, seed: int, client_processes: int) -> dict:
    """One pass of the workload at saturation: throughput and CPU per token."""
    steps0 = stack.steps()
    before, client0, wall0 = stack.cpu_seconds(), _client_cpu(), time.perf_counter()
    rate = serving.run_rate(stack.target, work, float("inf"), seed, client_processes)
    after, client1, wall1 = stack.cpu_seconds(), _client_cpu(), time.perf_counter()
    steps1 = stack.steps()
    tokens = sum(o for _, o in work)  # run_rate asserts each ran to max_tokens
    cpu = {name: after[name] - before[name] for name in after}
    cpu["client"] = client1 - client0  # (its start-up too, with client processes)
    if "gateway" not in cpu:  # several: their sum, comparable with one's
        cpu["gateway"] = sum(v for k, v in cpu.items() if k.startswith("gateway-"))
    return {
        "output_tokens": tokens,
        "seconds": wall1 - wall0,
        "output_tok_per_s": rate["output_tok_per_s"],
        "steps": steps1[0] - steps0[0],
        "sampled_tokens": steps1[1] - steps0[1],  # by the mirror: the tokens counted twice
        "tokens_per_step": (steps1[1] - steps0[1]) / max(1, steps1[0] - steps0[0]),
        "cpu_seconds": cpu,
        "us_per_token": {name: s / tokens * 1e6 for name, s in cpu.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-requests", type=int, default=400)
    parser.add_argument("--input-len", type=int, nargs=2, default=(32, 512))
    parser.add_argument("--output-len", type=int, nargs=2, default=(32, 256))
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--vocab-size", type=int, default=128256)
    parser.add_argument(
        "--step-ms", type=float, default=0.0, help="the mirror's time per step (0: answer at once)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed passes, after one warm-up")
    parser.add_argument(
        "--num-gateways",
        type=int,
        default=1,
        help="gateway processes sharing the port, as tessera serve starts them",
    )
    parser.add_argument(
        "--client-processes", type=int, default=1, help="serving.py's client in this many processes"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", help="a commit whose gateway and scheduler run too")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--mirror", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mirror:
        address, vocab, blocks, max_len, step_ms, counts_path = args.mirror
        run_mirror(address, int(vocab), int(blocks), int(max_len), float(step_ms), counts_path)
        return 0

    args.workload = "uniform"
    work = serving.workload(args)
    num_ideal = ideal_steps(work, args)
    tokens = sum(o for _, o in work)
    ideal_tok_s = tokens / (num_ideal * args.step_ms / 1e3) if args.step_ms > 0 else None
    trees: dict[str, Path | None] = {"current": None}
    scratch = None
    if args.baseline:
        from host_overhead import baseline_tree

        scratch = Path(tempfile.mkdtemp(prefix="tessera-served-baseline-"))
        trees = {"baseline": baseline_tree(args.baseline, scratch), "current": None}
    passes: dict[str, list[dict]] = {name: [] for name in trees}
    try:
        for _ in range(args.repeats):  # interleaved, a fresh stack a pass
            for name, path in trees.items():
                stack = Stack(args, path)
                try:
                    stack.wait_healthy()
                    serving.run_rate(stack.target, work[:32], float("inf"), args.seed)
                    passes[name].append(timed_pass(stack, work, args.seed, args.client_processes))
                finally:
                    stack.close()
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(
        f"{len(work)} requests, {tokens} output tokens a pass; the scheduler alone, one "
        f"step at a time: {num_ideal} steps, {tokens / num_ideal:.0f} tokens a step"
    )
    if ideal_tok_s:
        print(f"at {args.step_ms} ms a step, in-process: {ideal_tok_s:,.0f} output tok/s")
    summary = {}
    for name, runs in passes.items():
        names = list(runs[0]["us_per_token"])
        median = {n: statistics.median(p["us_per_token"][n] for p in runs) for n in names}
        tok_s = statistics.median(p["output_tok_per_s"] for p in runs)
        summary[name] = {
            "us_per_token_median": median,
            "output_tok_per_s_median": tok_s,
            "tokens_per_step_median": statistics.median(p["tokens_per_step"] for p in runs),
            "served_over_ideal": tok_s / ideal_tok_s if ideal_tok_s else None,
            "passes": runs,
        }
        ratio = f", served / in-process {tok_s / ideal_tok_s:.2f}" if ideal_tok_s else ""
        print(
            f"\n[{name}] {tok_s:,.0f} output tok/s, "
            f"{summary[name]['tokens_per_step_median']:.0f} tokens a step{ratio} "
            f"(medians of {len(runs)})"
        )
        print(f"{'process':<10} {'us/token':>9} {'ceiling tok/s':>14}")
        for n in sorted(names, key=lambda n: -median[n]):
            # (/proc counts CPU in clock ticks, 10 ms: a short pass may read 0)
            ceiling = f"{1e6 / median[n]:>14,.0f}" if median[n] else f"{'-':>14}"
            print(f"{n:<10} {median[n]:>9.1f} {ceiling}")
    if args.baseline:
        base, cur = (
            summary["baseline"]["us_per_token_median"],
            summary["current"]["us_per_token_median"],
        )
        print(
            "\nCPU per token, baseline / current: "
            + ", ".join(f"{n} {base[n] / cur[n]:.2f}x" for n in cur)
        )
    if args.json:
        record = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version(),
            "command": " ".join(sys.argv),
            "args": {
                k: v for k, v in vars(args).items() if k not in ("json", "mirror", "baseline")
            },
            "baseline": args.baseline,
            "ideal_steps": num_ideal,
            "ideal_output_tok_per_s": ideal_tok_s,
            "results": summary,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
