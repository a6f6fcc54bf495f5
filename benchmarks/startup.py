"""Start-up time of ``tessera serve``: to a healthy server, and to the first token of the
first request after that, per stage, cold and warm.

    .venv/bin/python benchmarks/startup.py [--model smollm2-135m-instruct] [--warm 2]
        [--out benchmarks/results/startup_cpu.json]

Cold: a fresh numba cache directory (the CPU decode-attention kernel compiles on first
use) -- the first start after install, as near as a benchmark can get without dropping
the OS page cache. Warm: later starts with that cache on disk. Each start is timed from
the launcher's spawn to the line each stage logs when it is ready (read as it arrives on
stderr), to the first ``GET /health`` that answers 200, and then to the first streamed
token and the last of one chat request (32 tokens, greedy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
# stage -> the text of the log line that says it is ready
READY_LINES = {
    "executor": "tessera.executor.server: ready:",
    "scheduler": "to gateways on",
    "tokenizer": "serving the tokenizer of",
    "gateway": "gateway serving",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_start(model: str, numba_dir: str) -> dict:
    port, http_port = free_port(), free_port()
    env = dict(os.environ, TESSERA_LOG_LEVEL="INFO", NUMBA_CACHE_DIR=numba_dir)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "tessera", "serve", model, "--port", str(port),
         "--http-port", str(http_port)],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    ready: dict[str, float] = {}
    lines: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            for stage, text in READY_LINES.items():
                if text in line:  # the last replica to be ready counts
                    ready[stage] = time.monotonic() - t0

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{http_port}"
    result: dict = {}
    try:
        with httpx.Client(base_url=url, timeout=120) as http:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError("the server exited:\n" + "".join(lines[-20:]))
                try:
                    if http.get("/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
            healthy = time.monotonic() - t0
            body = {"model": model, "max_tokens": 32, "temperature": 0, "stream": True,
                    "messages": [{"role": "user", "content": "Write a haiku about the sea"}]}
            sent = time.monotonic()
            first = None
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                for line in r.iter_lines():
                    if first is None and '"content":"' in line:
                        first = time.monotonic() - sent
            total = time.monotonic() - sent
        result = {"healthy_s": round(healthy, 2), "first_token_s": round(first or total, 3),
                  "first_request_s": round(total, 3),
                  "stage_ready_s": {k: round(v, 2) for k, v in sorted(ready.items())},
                  "log_lines": len(lines)}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        reader.join(5)
    result["stop_exit_code"] = proc.returncode
    result["errors_logged"] = [line.strip() for line in lines if " ERROR " in line]
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the model to serve")
    ap.add_argument("--warm", type=int, default=2, help="warm starts after the cold one")
    ap.add_argument("--out", default=None, help="write the results here as JSON")
    args = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="tessera-numba-") as numba_dir:
        for i in range(1 + args.warm):
            kind = "cold" if i == 0 else "warm"
            r = {"start": kind, **one_start(args.model, numba_dir)}
            runs.append(r)
            print(json.dumps(r), flush=True)
    load = os.getloadavg()
    report = {"model": args.model, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "load_average_after": [round(x, 2) for x in load], "runs": runs,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
