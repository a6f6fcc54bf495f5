"""Host overhead: the scheduler process's CPU time per step (issue 22, item 4).

The real scheduler loop (``SchedulerServer.serve``, the real ``ExecutorLink`` and the
real gateway ROUTER, every message encoded and decoded as in production) runs in a
worker process; a peer process plays both its neighbours, so their work is not
counted:

    peer: gateway DEALER ──► worker: SchedulerServer ──► peer: mirror executor
          (sends requests,     (the process measured)      (applies the mirror rule and
           reads every output)                              answers each plan at once
                                                            with plausible tokens; no torch)

Measured: the worker's CPU time (``time.process_time``: the loop thread and ZeroMQ's
I/O thread) and the loop thread's alone (``time.thread_time``) over ``--steps`` steps,
per step, after a warm-up. The workloads:

    decode-64, decode-256  that many sequences, every one decoding in every measured
                           step (their prompts were prefilled during the warm-up)
    churn-256              256 sequences in flight, outputs of 16..256 tokens (seed 0);
                           the gateway sends a new one as each finishes, so admissions,
                           prefill chunks, finishes and frees happen in most steps

``--baseline COMMIT`` runs the same benchmark (this file) against the tree of an older
commit, extracted with ``git archive`` into a temporary folder (the repository's list of
worktrees is left alone) with its own stubs generated, and prints the two side by side.

    .venv/bin/python benchmarks/host_overhead.py --baseline main --repeats 5 \\
        --json benchmarks/results/host_overhead_cpu.json

The worker and the peer import ``tessera`` from the tree under test: the installed one,
or the baseline's (through a folder of links put first on ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

WORKLOADS = {  # name -> (sequences in flight, whether they finish and are replaced)
    "decode-64": (64, False),
    "decode-256": (256, False),
    "churn-256": (256, True),
}
VOCAB = 32000
EOS = 2
BLOCK_SIZE = 16
PROMPT_LEN = (16, 256)  # churn prompts (decode prompts are 32 tokens)
OUTPUT_LEN = (16, 256)  # churn outputs
STAGES = ("common", "executor", "kernels", "proto", "scheduler", "services", "tokenizer_svc")
REPO = Path(__file__).resolve().parents[1]


# -- the peer: gateway and mirror executor ------------------------------------------


def run_peer(gateway_address: str, executor_address: str, workload: str, num_kv_blocks: int,
             max_tokens: int) -> None:
    """Answer plans and send requests until killed (the worker ends it)."""
    import zmq

    from tessera.common import wire
    from tessera.common.plan import StepResult
    from tessera.proto.tessera.v1 import engine_pb2 as pb

    num_seqs, churn = WORKLOADS[workload]
    ctx = zmq.Context()
    executor = ctx.socket(zmq.DEALER)
    executor.connect(executor_address)
    info = pb.EngineInfo(model="mirror", max_model_len=max_tokens + 512, vocab_size=VOCAB,
                         block_size=BLOCK_SIZE, num_kv_blocks=num_kv_blocks,
                         eos_token_ids=[EOS])  # fmt: skip
    executor.send(wire.encode(pb.ExecutorReady(info=info, max_position_embeddings=1 << 20)))
    gateway = ctx.socket(zmq.DEALER)
    gateway.setsockopt(zmq.IDENTITY, b"gw-bench")
    gateway.connect(gateway_address)
    # The per-sequence view of an EngineOutputs, as each version of the wire gives it.
    unpack = getattr(wire, "sequence_outputs", None) or (lambda out: out.outputs)

    rng = random.Random(0)
    next_id = 0

    def send_one() -> None:
        nonlocal next_id
        if churn:
            prompt_len, out_len = rng.randint(*PROMPT_LEN), rng.randint(*OUTPUT_LEN)
        else:
            prompt_len, out_len = 32, max_tokens
        seq = pb.AddSequence(
            request_id=f"gw-bench/{next_id}",
            prompt_token_ids=[rng.randrange(100, VOCAB) for _ in range(prompt_len)],
            sampling=pb.SamplingOptions(temperature=0.0, top_p=1.0, repetition_penalty=1.0),
            stop=pb.StopConditions(max_tokens=out_len, ignore_eos=True),
        )
        next_id += 1
        gateway.send(pb.GatewayMessage(add=pb.AddRequests(sequences=[seq])).SerializeToString())

    for _ in range(num_seqs):
        send_one()
    mirrors: dict[str, list[int]] = {}  # mirror_step's
    poller = zmq.Poller()
    poller.register(executor, zmq.POLLIN)
    poller.register(gateway, zmq.POLLIN)
    while True:
        ready = dict(poller.poll())
        if executor in ready:
            pb_plan = wire.decode(pb.StepPlan, executor.recv())
            sampled = mirror_step(wire.plan_from_pb(pb_plan), mirrors, VOCAB)
            result = wire.result_to_pb(StepResult(sampled_token_ids=sampled), pb_plan.step_id)
            executor.send(wire.encode(result))
        if gateway in ready:
            out = wire.decode(pb.EngineOutputs, gateway.recv())
            if churn:
                for seq in unpack(out):
                    if seq.finished:
                        send_one()


def mirror_step(plan, mirrors: dict[str, list[int]], vocab_size: int) -> dict[str, int]:
    """The tokens an executor samples for ``plan`` by the mirror rule (a request samples
    when its computed tokens reach the end of its known ones), plausible and never an id
    below 100 (EOS is one); ``mirrors`` (request id -> [tokens known, tokens computed])
    follows the plan's new and finished requests."""
    for rid in plan.finished_request_ids:
        mirrors.pop(rid, None)
    for new in plan.new_requests:
        mirrors[new.request_id] = [len(new.all_token_ids), new.num_computed_tokens]
    sampled = {}
    for rid, num in plan.num_scheduled_tokens.items():
        mirror = mirrors[rid]
        mirror[1] += num
        if mirror[1] == mirror[0]:
            mirror[0] += 1
            sampled[rid] = 100 + (mirror[0] * 7919) % (vocab_size - 100)
    return sampled


# -- the worker: the scheduler loop, measured ----------------------------------------


def run_worker(workload: str, warmup: int, steps: int) -> dict:
    import zmq

    import tessera.scheduler
    from tessera.scheduler.config import SchedulerServerConfig
    from tessera.scheduler.executor_link import ExecutorLink, bind
    from tessera.scheduler.server import SchedulerServer

    num_seqs, churn = WORKLOADS[workload]
    max_tokens = warmup + steps + 64  # decode sequences outlive the measurement
    num_kv_blocks = num_seqs * ((32 + 256 + max_tokens) // BLOCK_SIZE + 2)
    run_dir = tempfile.mkdtemp(prefix="tessera-host-bench-")
    config = SchedulerServerConfig(
        gateway_address=f"ipc://{run_dir}/gateway.sock",
        executor_address=f"ipc://{run_dir}/executor.sock",
        start_executor=False,
        step_timeout=None,
        block_size=BLOCK_SIZE,
        max_num_seqs=num_seqs,
        max_num_batched_tokens=2048,
    )
    stop = threading.Event()
    ctx = zmq.Context()
    link = ExecutorLink(ctx, config, stop)
    peer = subprocess.Popen(
        [sys.executable, __file__, "--peer", config.gateway_address, config.executor_address,
         workload, str(num_kv_blocks), str(max_tokens)],
    )  # fmt: skip
    try:
        gateways = ctx.socket(zmq.ROUTER)
        gateways.setsockopt(zmq.ROUTER_MANDATORY, 1)
        bind(gateways, config.gateway_address)
        info = link.wait_ready(60)
        server = _measured_server(SchedulerServer)(config, info, link, gateways, stop)
        server.plan_window(num_seqs, churn, warmup, steps)
        deadline = threading.Timer(600, stop.set)  # a wedged run ends, unmeasured
        deadline.start()
        server.serve()
        deadline.cancel()
        if server.window is None:
            raise RuntimeError(f"{workload}: the measured window was never reached")
        return {
            "workload": workload,
            "scheduler_module": tessera.scheduler.__file__,
            **server.window,
        }
    finally:
        peer.kill()
        peer.wait()
        link.close()
        ctx.destroy(linger=0)
        shutil.rmtree(run_dir, ignore_errors=True)


def _measured_server(base: type) -> type:
    """SchedulerServer, counting steps in start_step (a method every version has)."""

    class MeasuredServer(base):
        def plan_window(self, num_seqs: int, churn: bool, warmup: int, steps: int) -> None:
            self._want = (num_seqs, churn, warmup, steps)
            self._step = 0
            self._start: tuple[int, float, float, float, int] | None = None
            self.window: dict | None = None

        def start_step(self, plan):
            num_seqs, churn, warmup, steps = self._want
            self._step += 1
            if self._start is None:
                settled = (self._step >= warmup if churn else
                           self._step >= 8 and self.scheduler.num_running == num_seqs
                           and self.scheduler.num_waiting == 0)  # fmt: skip
                if settled:
                    self._start = (self._step, time.process_time(), time.thread_time(),
                                   time.perf_counter(), self.counters.num_generated_tokens)
            elif self._step - self._start[0] == steps:
                step0, cpu0, thread0, wall0, tokens0 = self._start
                self.window = {
                    "steps": steps,
                    "cpu_ms_per_step": (time.process_time() - cpu0) / steps * 1e3,
                    "thread_ms_per_step": (time.thread_time() - thread0) / steps * 1e3,
                    "wall_ms_per_step": (time.perf_counter() - wall0) / steps * 1e3,
                    "tokens_per_step": (self.counters.num_generated_tokens - tokens0) / steps,
                    "running_at_end": self.scheduler.num_running,
                    "first_measured_step": step0,
                }
                self.stop.set()
            return super().start_step(plan)

    return MeasuredServer


# -- driving it: trees, repeats, the table ------------------------------------------


def baseline_tree(commit: str, into: Path) -> Path:
    """A folder to put on PYTHONPATH whose ``tessera`` is ``commit``'s tree."""
    src = into / "src"
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit],
                             check=True, capture_output=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    subprocess.run([sys.executable, str(src / "proto" / "build_stubs.py")], check=True)
    package = into / "path" / "tessera"
    package.mkdir(parents=True)
    for entry in (src / "tessera").iterdir():
        (package / entry.name).symlink_to(entry)
    for stage in STAGES:
        (package / stage).symlink_to(src / stage)
    return into / "path"


def measure(workload: str, args: argparse.Namespace, pythonpath: Path | None) -> dict:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    out = subprocess.run(
        [sys.executable, __file__, "--worker", workload, "--warmup", str(args.warmup),
         "--steps", str(args.steps)],
        env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    cpu = [r["cpu_ms_per_step"] for r in runs]
    return {
        "cpu_ms_per_step_median": statistics.median(cpu),
        "cpu_ms_per_step_min": min(cpu),
        "thread_ms_per_step_median": statistics.median(r["thread_ms_per_step"] for r in runs),
        "wall_ms_per_step_median": statistics.median(r["wall_ms_per_step"] for r in runs),
        "tokens_per_step_median": statistics.median(r["tokens_per_step"] for r in runs),
        "runs": runs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--steps", type=int, default=500, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=300, help="steps before measuring churn")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", help="a commit to measure side by side")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--peer", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        gateway, executor, workload, num_kv_blocks, max_tokens = args.peer
        run_peer(gateway, executor, workload, int(num_kv_blocks), int(max_tokens))
        return 0
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.warmup, args.steps)))
        return 0

    trees: dict[str, Path | None] = {"current": None}
    scratch = None
    if args.baseline:
        scratch = Path(tempfile.mkdtemp(prefix="tessera-host-baseline-"))
        trees = {"baseline": baseline_tree(args.baseline, scratch), "current": None}
    try:
        results: dict[str, dict[str, dict]] = {name: {} for name in trees}
        for workload in args.workloads:
            for _ in range(args.repeats):  # interleaved, so both see the same machine load
                for name, path in trees.items():
                    results[name].setdefault(workload, {"runs": []})
                    results[name][workload]["runs"].append(measure(workload, args, path))
        for name in trees:
            for workload in args.workloads:
                results[name][workload] = summarize(results[name][workload]["runs"])
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    print(f"{'workload':<12} {'tree':<9} {'cpu ms/step':>12} {'(min)':>7} "
          f"{'loop thread':>12} {'wall ms':>8} {'tok/step':>9}")  # fmt: skip
    for workload in args.workloads:
        for name in trees:
            r = results[name][workload]
            print(f"{workload:<12} {name:<9} {r['cpu_ms_per_step_median']:>12.3f} "
                  f"{r['cpu_ms_per_step_min']:>7.3f} {r['thread_ms_per_step_median']:>12.3f} "
                  f"{r['wall_ms_per_step_median']:>8.3f} {r['tokens_per_step_median']:>9.1f}")
        if args.baseline:
            ratio = (results["baseline"][workload]["cpu_ms_per_step_median"]
                     / results["current"][workload]["cpu_ms_per_step_median"])  # fmt: skip
            print(f"{workload:<12} {'speed-up':<9} {ratio:>11.2f}x")
    if args.json:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()  # fmt: skip
        record = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version(),
            "command": " ".join(sys.argv),
            "current": head,
            "baseline": args.baseline,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
