"""`tessera serve --replicas N` as the launcher lays it out (issue 17): one scheduler
per replica on its own sockets, one gateway linked to all of them, and, on GPUs, each
replica on its own devices. No process is started here."""

from __future__ import annotations

import pytest

from tessera.serve import ServeConfig, child_commands, child_env


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_each_replica_has_its_own_sockets_and_the_gateway_links_all():
    commands = dict(child_commands(ServeConfig(replicas=3, num_tokenizers=1), "/run"))
    assert sorted(commands) == ["gateway", "scheduler-0", "scheduler-1", "scheduler-2",
                                "tokenizer-0"]  # fmt: skip
    schedulers = [commands[f"scheduler-{r}"] for r in range(3)]
    addresses = [flag(c, "--gateway-address") for c in schedulers]
    assert addresses == [f"ipc:///run/scheduler-{r}.sock" for r in range(3)]
    assert [flag(c, "--executor-address") for c in schedulers] == [
        f"ipc:///run/executor-{r}.sock" for r in range(3)]
    gateway = commands["gateway"]
    assert flag(gateway, "--scheduler-address") == ",".join(addresses)
    assert flag(gateway, "--routing-policy") == "cache_aware"


def test_one_replica_keeps_its_names_and_auto_follows_prefix_caching():
    commands = dict(child_commands(ServeConfig(enable_prefix_caching=False), "/run"))
    assert "scheduler" in commands and "scheduler-0" not in commands
    assert flag(commands["gateway"], "--scheduler-address") == "ipc:///run/scheduler.sock"
    assert flag(commands["gateway"], "--routing-policy") == "least_loaded"
    rr = dict(child_commands(ServeConfig(replicas=2, routing_policy="round_robin"), "/r"))
    assert flag(rr["gateway"], "--routing-policy") == "round_robin"
    with pytest.raises(ValueError, match="routing policy must be one of"):
        ServeConfig(routing_policy="random")
    with pytest.raises(ValueError, match="replicas must be >= 1"):
        ServeConfig(replicas=0)


def test_replicas_get_disjoint_devices():
    def devices(name: str, config: ServeConfig, visible: str | None) -> str | None:
        environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
        env = child_env(name, config, environ)
        return None if env is None else env.get("CUDA_VISIBLE_DEVICES")

    two = ServeConfig(replicas=2, device="cuda")
    assert [devices(f"scheduler-{r}", two, None) for r in range(2)] == ["0", "1"]
    assert [devices(f"scheduler-{r}", two, "4,5,6") for r in range(2)] == ["4", "5"]
    tp = ServeConfig(replicas=2, device="cuda", tensor_parallel_size=3)  # 9 heads split 3x
    assert [devices(f"scheduler-{r}", tp, "0,1,2,3,4,5") for r in range(2)] == [
        "0,1,2", "3,4,5"]
    with pytest.raises(ValueError, match="need 6 devices; CUDA_VISIBLE_DEVICES='0,1,2' lists 3"):
        devices("scheduler-1", tp, "0,1,2")
    assert devices("scheduler-1", ServeConfig(replicas=2, device="cpu"), None) is None
    assert devices("scheduler", ServeConfig(device="cuda"), "0,1") is None  # one replica
    assert devices("gateway", two, None) is None and devices("tokenizer-0", two, None) is None
