"""Start-up stalls and shutdown leftovers (issue 19).

- The gateway loads its tokenizer (seconds) off its event loop, while it waits for the
  scheduler: a loop held that long sends no heartbeat, and a loaded machine made the
  scheduler expire the gateway as silent. In process, with the wait for the scheduler
  replaced by a probe that measures how late the loop runs while the tokenizer loads.
- ``tessera serve`` without ``--run-dir`` removes the run directory of sockets it made,
  after a clean shutdown: a real launcher, stopped with SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tessera.services import gateway
from tessera.tokenizer_svc.tokenizer import Tokenizer
from tests.services.launch import ROOT, START_TIMEOUT, free_port

pytestmark = pytest.mark.slow


class _Probed(Exception):
    """Ends the gateway's start-up once the probe has seen the tokenizer loaded."""


def test_the_gateway_loads_its_tokenizer_off_the_event_loop(monkeypatch, tmp_path):
    loaded = threading.Event()
    load = Tokenizer.load
    spans: list[float] = []

    def load_and_tell(source):
        t0 = time.monotonic()
        tokenizer = load(source)
        # The default model's tokenizer now loads in a fraction of a second (issue 20);
        # a larger vocabulary, or a loaded machine, takes seconds: Python work stands for
        # them, holding the GIL in bursts as a load does.
        while time.monotonic() - t0 < 1.5:
            sum(range(10_000))
        spans.append(time.monotonic() - t0)
        loaded.set()
        return tokenizer

    monkeypatch.setattr(Tokenizer, "load", staticmethod(load_and_tell))
    lags: list[float] = []

    async def probe(engine, attempts: int = 600):
        """Stands for the wait on the scheduler (none runs here): tick every 10 ms until
        the tokenizer has loaded, recording how late each tick ran."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not loaded.is_set() and loop.time() < deadline:
            before = loop.time()
            await asyncio.sleep(0.01)
            lags.append(loop.time() - before - 0.01)
        raise _Probed

    monkeypatch.setattr(gateway, "_wait_for_engine", probe)
    config = gateway.GatewayConfig(
        scheduler_address=f"ipc://{tmp_path}/scheduler.sock", http_port=0
    )
    with pytest.raises(_Probed):
        asyncio.run(gateway.serve(config))
    assert loaded.is_set(), "the tokenizer did not load while the gateway waited"
    (load_s,) = spans
    assert load_s > 0.5  # a real load, long enough to see a stall
    # Held by the load, the loop would tick once, late by the whole load. Off the loop it
    # ticks on through it; the load's thread holds the GIL for stretches (longer on a
    # busy machine), so the bound is relative: no pause near the load's own length.
    assert len(lags) >= 10, f"the loop ticked {len(lags)} times in a {load_s:.2f}s load"
    assert max(lags) < 0.5 * load_s, (
        f"the event loop stalled {max(lags):.2f}s during a {load_s:.2f}s load"
    )


def test_the_launcher_removes_its_run_directory_after_a_clean_shutdown(tmp_path):
    """Its temp directory lands in TMPDIR, here a folder of the test's own."""
    port = free_port()
    env = dict(os.environ, TMPDIR=str(tmp_path), TESSERA_LOG_LEVEL="WARNING")
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "tessera", "serve", "--port", str(port),
         "--http-port", "0", "--num-tokenizers", "1", "--max-model-len", "256"],
        cwd=ROOT, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.5)
        run_dirs = list(tmp_path.glob("tessera-*"))
        assert run_dirs and (run_dirs[0] / "tokenizer-0.sock").exists(), run_dirs
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not list(tmp_path.glob("tessera-*")), "the run directory was left behind"
