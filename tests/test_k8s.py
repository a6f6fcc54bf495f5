"""deploy/k8s against Kubernetes and against the code (issue 17): every manifest is valid
at a pinned Kubernetes version (kubernetes-validate, strict: no unknown fields) and
lint-clean (yamllint); the kustomizations list every file and render (with kubectl's
built-in kustomize, where kubectl is installed); every container runs a Tessera module
whose own parser accepts its flags and, through its ConfigMap, its environment; probes,
disruption budgets, GPUs and Secrets are where the design says."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

from tessera.common.cli_args import add_config_args, config_from_args, env_name
from tessera.scheduler.config import SchedulerServerConfig
from tessera.services.engine_pool import split_addresses
from tessera.services.gateway import GatewayConfig
from tessera.tokenizer_svc.__main__ import TOKENIZER_FLAGS, add_env_flags
from tessera.tokenizer_svc.server import TokenizerServerConfig

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33.0"  # the oldest supported release when this was written
KUSTOMIZATIONS = [K8S / "base", K8S / "overlays" / "cpu"]
LINT = YamlLintConfig("""
extends: default
rules:
  line-length: {max: 100}
  document-start: disable
  truthy: {check-keys: false}
  comments: {min-spaces-from-content: 1}
""")


def manifests() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


def resources(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def base_objects() -> list[dict]:
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    return [d for name in base["resources"] for d in resources(K8S / "base" / name)]


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


@pytest.mark.parametrize("path", manifests(), ids=lambda p: str(p.relative_to(K8S)))
def test_yamllint_clean(path):
    problems = list(linter.run(path.read_text(), LINT, str(path)))
    assert not problems, "\n".join(f"{p.line}:{p.column} {p.message}" for p in problems)


@pytest.mark.parametrize("path", [p for p in manifests() if p.name != "kustomization.yaml"],
                         ids=lambda p: str(p.relative_to(K8S)))  # fmt: skip
def test_manifests_are_valid_kubernetes(path):
    for doc in resources(path):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kustomizations_list_every_file():
    for folder in KUSTOMIZATIONS:
        listed = yaml.safe_load((folder / "kustomization.yaml").read_text())["resources"]
        files = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
        assert files == {r for r in listed if not r.startswith("..")}, folder


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_kustomizations_render_valid_objects(folder):
    out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    objects = [d for d in yaml.safe_load_all(out) if d]
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    engine = by_kind(objects, "StatefulSet")["tessera-engine"]
    container = engine["spec"]["template"]["spec"]["containers"][0]
    devices = by_kind(objects, "ConfigMap")["tessera-engine"]["data"]["TESSERA_DEVICE"]
    if folder.name == "cpu":
        assert "nvidia.com/gpu" not in str(container["resources"]) and devices == "cpu"
        assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {
            "tessera"}
        assert all(c["image"] == "tessera:cpu" for c in _containers(objects))
    else:
        assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert all(c["image"] == "tessera:cuda" for c in _containers(objects))


def _containers(objects: list[dict]) -> list[dict]:
    return [c for o in objects if o["kind"] in ("Deployment", "StatefulSet")
            for c in o["spec"]["template"]["spec"]["containers"]]  # fmt: skip


def _config(module: str, args: list[str], environ: dict[str, str]):
    """What the module's own parser makes of these flags and this environment."""
    if module == "tessera.tokenizer_svc":
        known = {f.env for f in TOKENIZER_FLAGS}
        assert set(environ) <= known, f"{module}: unknown variables {set(environ) - known}"
        parser = argparse.ArgumentParser()
        add_env_flags(parser, TOKENIZER_FLAGS, environ)
        a = parser.parse_args(args)
        return TokenizerServerConfig(model=a.model, address=a.address,
                                     max_workers=a.max_workers, grace_seconds=a.grace_seconds)
    config_cls = {"tessera.services": GatewayConfig,
                  "tessera.scheduler": SchedulerServerConfig}[module]  # fmt: skip
    known = {env_name(f) for f in config_cls.__dataclass_fields__}
    assert set(environ) <= known, f"{module}: unknown variables {set(environ) - known}"
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_config_args(parser, config_cls)
    return config_from_args(config_cls, parser.parse_args(args), environ=environ)


def test_every_container_command_and_environment_parse():
    objects = base_objects()
    maps = by_kind(objects, "ConfigMap")
    seen = {}
    for obj in objects:
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for c in obj["spec"]["template"]["spec"]["containers"]:
            python, no_path, m, module, *args = c["command"]
            assert (python, no_path, m) == ("python3", "-P", "-m")  # the image's ENTRYPOINT
            environ = {}
            for source in c.get("envFrom", []):
                environ.update(maps[source["configMapRef"]["name"]]["data"])
            seen[module] = _config(module, args, environ)
    assert set(seen) == {"tessera.tokenizer_svc", "tessera.scheduler", "tessera.services"}
    gateway, engine = seen["tessera.services"], seen["tessera.scheduler"]
    # the gateway reaches every engine replica through the headless Service, with CURVE
    services = by_kind(objects, "Service")
    port = engine.gateway_address.rpartition(":")[2]
    assert split_addresses(gateway.scheduler_address) == [f"dns://tessera-engine:{port}"]
    assert services["tessera-engine"]["spec"]["clusterIP"] == "None"
    assert gateway.curve_secret_key_file and engine.curve_secret_key_file
    assert gateway.routing_policy == "cache_aware"
    tokenizer_port = seen["tessera.tokenizer_svc"].address.rpartition(":")[2]
    assert gateway.tokenizer_addresses == f"dns:///tessera-tokenizer:{tokenizer_port}"
    assert services["tessera-tokenizer"]["spec"]["clusterIP"] == "None"


def test_probes_budgets_gpus_and_secrets():
    objects = base_objects()
    workloads = {**by_kind(objects, "Deployment"), **by_kind(objects, "StatefulSet")}
    assert set(workloads) == {"tessera-gateway", "tessera-tokenizer", "tessera-engine"}
    budgets = by_kind(objects, "PodDisruptionBudget")
    for name, w in workloads.items():
        pod = w["spec"]["template"]
        c = pod["spec"]["containers"][0]
        assert budgets[name]["spec"]["selector"] == w["spec"]["selector"]
        assert w["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert "readinessProbe" in c and "livenessProbe" in c and c["resources"]["requests"]
        if name != "tessera-engine":  # the engine serves ZeroMQ: an open port is ready
            assert c["readinessProbe"]["grpc"]["port"] == c["ports"][0]["containerPort"]
            assert c["livenessProbe"]["grpc"]["port"] == c["ports"][0]["containerPort"]
    engine = workloads["tessera-engine"]
    assert engine["spec"]["serviceName"] == "tessera-engine"
    requests = engine["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert requests["requests"]["nvidia.com/gpu"] == requests["limits"]["nvidia.com/gpu"]
    hpa = by_kind(objects, "HorizontalPodAutoscaler")["tessera-gateway"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "tessera-gateway"
    # each pod gets only the keys it needs from the tessera-curve Secret
    def key_items(name: str) -> dict[str, str]:
        volume = next(v for v in workloads[name]["spec"]["template"]["spec"]["volumes"]
                      if v["name"] == "keys")  # fmt: skip
        assert volume["secret"]["secretName"] == "tessera-curve"
        return {i["key"]: i["path"] for i in volume["secret"]["items"]}

    assert key_items("tessera-engine") == {"scheduler.key_secret": "scheduler.key_secret",
                                           "gateway.key": "clients/gateway.key"}
    assert key_items("tessera-gateway") == {"gateway.key_secret": "gateway.key_secret",
                                            "scheduler.key": "scheduler.key"}
    gateway = workloads["tessera-gateway"]["spec"]["template"]["spec"]["containers"][0]
    api_key = next(e for e in gateway["env"] if e["name"] == "TESSERA_API_KEY")
    assert api_key["valueFrom"]["secretKeyRef"]["name"] == "tessera-api-key"
