"""`tessera serve --cluster ray` without a cluster (issue 17): what each replica asks Ray
for, the commands of the processes that stay here, the keys held in memory, and the
one-line errors (exit 2) when Ray or its cluster is missing. The run on a real Ray head
is tests/cluster/test_ray.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq.auth

from tessera.common.curve import certificate_text
from tessera.common.preflight import ConfigError
from tessera.ray_serve import (
    RayReplicas,
    check_room,
    hold_in_memory,
    replica_bundles,
    uses_gpus,
    write_listing,
)
from tessera.serve import ServeConfig, child_commands
from tessera.services.engine_pool import read_address_file
from tests.services.launch import free_port


def test_one_bundle_per_device_and_the_cpus_spread_over_them():
    assert replica_bundles(ServeConfig(device="cpu"), gpus=False) == [{"CPU": 1.0}]
    tp = ServeConfig(device="cuda", tensor_parallel_size=3, ray_num_cpus=6)
    assert replica_bundles(tp, gpus=True) == [{"CPU": 2.0, "GPU": 1.0}] * 3
    assert uses_gpus(ServeConfig(device="cuda"), {"CPU": 8})
    assert uses_gpus(ServeConfig(), {"CPU": 8, "GPU": 2})
    assert not uses_gpus(ServeConfig(), {"CPU": 8})
    assert not uses_gpus(ServeConfig(device="cpu"), {"CPU": 8, "GPU": 2})


def test_a_cluster_too_small_is_a_config_error_naming_the_flags():
    check_room(ServeConfig(replicas=2, ray_num_cpus=2), {"CPU": 4.0}, gpus=False)
    with pytest.raises(ConfigError, match=r"has 3 CPU; 2 replicas need 4 \(--replicas"):
        check_room(ServeConfig(replicas=2, ray_num_cpus=2), {"CPU": 3.0}, gpus=False)
    with pytest.raises(ConfigError, match="has 2 GPU; 2 replicas need 4"):
        check_room(ServeConfig(replicas=2, tensor_parallel_size=2), {"CPU": 9, "GPU": 2},
                   gpus=True)  # fmt: skip
    with pytest.raises(ValueError, match="cluster must be one of"):
        ServeConfig(cluster="swarm")
    with pytest.raises(ValueError, match="ray_num_cpus must be > 0"):
        ServeConfig(ray_num_cpus=0)


def test_the_listing_is_what_the_gateway_reads(tmp_path):
    path = str(tmp_path / "replicas")
    write_listing(path, ["tcp://10.0.0.1:5000", "tcp://[::1]:5001"])
    assert read_address_file(path) == ["tcp://10.0.0.1:5000", "tcp://[::1]:5001"]
    write_listing(path, [])
    assert read_address_file(path) == [] and os.listdir(tmp_path) == ["replicas"]


def test_a_key_held_in_memory_is_read_by_a_child_and_gone_with_its_holder():
    public, secret = zmq.curve_keypair()
    fd, path = hold_in_memory("scheduler.key_secret", certificate_text(public, secret))
    try:
        code = f"import zmq.auth; print(zmq.auth.load_certificate({path!r})[1].decode())"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True)  # fmt: skip
        assert out.stdout.strip() == secret.decode()
        assert zmq.auth.load_certificate(path) == (public, secret)
    finally:
        os.close(fd)
    assert not os.path.exists(path)  # nothing on disk outlives the holder


def test_the_gateway_reads_the_replica_list_with_curve_keys_and_no_scheduler_runs_here(
    tmp_path, monkeypatch
):
    config = ServeConfig(cluster="ray", replicas=2, num_tokenizers=2)
    replicas = RayReplicas(config, gpus=False)
    placed = []
    monkeypatch.setattr(RayReplicas, "_place", lambda self, r: placed.append(r.index))
    local = replicas.start(str(tmp_path), child_commands(config, str(tmp_path)), ["--x"])
    try:
        assert [name for name, _ in local] == ["tokenizer-0", "tokenizer-1", "gateway"]
        assert placed == [0, 1] and replicas.scheduler_flags == ["--x"]
        gateway = local[-1][1]
        listing = gateway[gateway.index("--scheduler-address") + 1]
        assert listing == f"file:{tmp_path}/replicas" and read_address_file(listing[5:]) == []
        secret = gateway[gateway.index("--curve-secret-key-file") + 1]
        server = gateway[gateway.index("--curve-server-key-file") + 1]
        assert secret.startswith(f"/proc/{os.getpid()}/fd/")
        assert zmq.auth.load_certificate(secret)[0] == replicas._gateway_pair[0]
        assert zmq.auth.load_certificate(server) == (replicas._scheduler_pair[0], None)
        assert sorted(os.listdir(tmp_path)) == ["replicas"]  # no key file anywhere
    finally:
        for fd in replicas._fds:
            os.close(fd)


def test_each_of_several_gateways_reads_the_replica_list_with_the_keys(tmp_path, monkeypatch):
    config = ServeConfig(cluster="ray", replicas=2, num_tokenizers=0, num_gateways=2,
                         model="random:smollm2-135m")  # fmt: skip
    replicas = RayReplicas(config, gpus=False)
    monkeypatch.setattr(RayReplicas, "_place", lambda self, r: None)
    local = replicas.start(str(tmp_path), child_commands(config, str(tmp_path)), ["--x"])
    try:
        assert [name for name, _ in local] == ["gateway-0", "gateway-1"]
        for _, gateway in local:
            assert gateway[gateway.index("--scheduler-address") + 1] == f"file:{tmp_path}/replicas"
            assert "--curve-secret-key-file" in gateway and "--reuse-port" in gateway
    finally:
        for fd in replicas._fds:
            os.close(fd)


def _serve(*flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    args = ["--port", str(free_port()), "--http-port", "0", *flags]
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-P", "-m", "tessera", "serve", *args],
                          capture_output=True, text=True, timeout=120,
                          env={**environ, **(env or {})})  # fmt: skip


def test_no_cluster_is_one_line_and_exit_2():
    done = _serve("--cluster", "ray", "--ray-address", f"127.0.0.1:{free_port()}")
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "cannot join the Ray cluster at 127.0.0.1:" in errors[0]
    assert "ray start --head" in errors[0] and "Traceback" not in done.stderr


def test_without_ray_installed_it_says_how_to_get_it(tmp_path):
    fake = Path(tmp_path, "ray")
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('no ray here')\n")
    done = _serve("--cluster", "ray", env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 2, done.stderr
    assert "--cluster ray needs Ray: pip install 'tessera[ray]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_guard_passes_sigterm_on_and_its_child_outlives_a_sigkill_of_it_cleanly(tmp_path):
    """What a killed Ray actor does to its children (SIGKILL, to them and its process
    group) stops at the guard: the scheduler, in a session of its own, gets SIGTERM."""
    marker = tmp_path / "stopped"
    child = (f"import signal, sys, time, pathlib\n"
             f"def stop(*_):\n    pathlib.Path({str(marker)!r}).write_text('clean')\n"
             f"    sys.exit(3)\n"
             f"signal.signal(signal.SIGTERM, stop)\n"
             f"from tessera.common.process import exit_with_parent\nexit_with_parent()\n"
             f"print('up', flush=True)\ntime.sleep(60)\n")  # fmt: skip

    def start() -> subprocess.Popen:  # a group of its own, as a Ray worker has
        proc = subprocess.Popen([sys.executable, "-P", "-m", "tessera.ray_serve", "--guard",
                                 "--", sys.executable, "-c", child],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert proc.stdout.readline() == "up\n"
        return proc

    guard = start()  # SIGTERM: passed on; the child's exit code comes back
    guard.send_signal(signal.SIGTERM)
    assert guard.wait(20) == 3 and marker.read_text() == "clean"
    marker.unlink()
    guard = start()  # SIGKILL of the guard's process group: the child stops cleanly
    os.killpg(guard.pid, signal.SIGKILL)
    assert guard.wait(20) == -signal.SIGKILL
    deadline = time.monotonic() + 20
    while not marker.exists():
        assert time.monotonic() < deadline, "the guard's child did not get SIGTERM"
        time.sleep(0.05)
    assert marker.read_text() == "clean"
