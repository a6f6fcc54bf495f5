"""`tessera serve` as the tests start it: every process real, on free ports, stopped
with SIGTERM (and killed, children included, if it hangs). Shared by the gRPC and the
OpenAI HTTP tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tessera.proto.tessera.v1 import generate_pb2_grpc as pb_grpc
from tests.proctable import descendants

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 180.0
# Text prompts the served tests generate from (the default model, greedy).
PROMPTS = [
    "The capital of France is",
    "def quicksort(arr):",
    "Once upon a time in a land far away, there lived",
    "1 2 3 4 5 6",
    "Write a list of five fruits:\n1.",
    "The quick brown fox",
    "Tessera is a serving engine that",
    "In 1969, the first humans",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``flags`` become ``--flag value``; ``env`` is added to the launcher's environment.
    ``tls_ca``: the gateway serves TLS (its tls_* flags) with a certificate this CA signed."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None,
                 tls_ca: bytes | None = None, **flags: str) -> None:
        self.port = free_port()
        self.http_port = free_port()
        self.run_dir = tmp
        args = [
            "--port",
            str(self.port),
            "--http-port",
            str(self.http_port),
            "--num-tokenizers",
            "2",
            "--run-dir",
            str(tmp),
            "--grace-seconds",
            "30",
        ]
        for k, v in flags.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        # The package is installed (editable in .venv): the repository itself is never put
        # on the path, where its folders would shadow packages of the same names.
        env = dict(os.environ, TESSERA_LOG_LEVEL="WARNING", **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "tessera", "serve", *args], cwd=ROOT, env=env
        )
        self.target = f"127.0.0.1:{self.port}"
        self.credentials = grpc.ssl_channel_credentials(tls_ca) if tls_ca else None
        self.http_url = f"{'https' if tls_ca else 'http'}://127.0.0.1:{self.http_port}"
        try:
            self._wait_healthy()
        except BaseException:
            # the caller gets no Server to stop: leave no process tree behind
            self.stop()
            raise

    def channel(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.target)
        return grpc.secure_channel(self.target, self.credentials)

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        with self.channel() as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"launcher exited with {self.proc.returncode}")
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.5)
        raise TimeoutError("the server did not become healthy")

    def stub(self) -> pb_grpc.TesseraStub:
        return pb_grpc.TesseraStub(self.channel())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                for pid in descendants(self.proc.pid):
                    os.kill(pid, signal.SIGKILL)
                self.proc.kill()
