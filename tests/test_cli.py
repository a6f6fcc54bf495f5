"""The command lines against the configs they build (issue 20): every field of every
config is a flag with help text that names its environment variable; no flag may be
abbreviated; every ``tessera serve`` setting reaches the stage that reads it; the
checks made before loading (ports, files, model) refuse what cannot work; default
sampling comes from the model's generation_config.json."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import socket
import subprocess
import sys

import pytest

from tessera.cli import build_parser
from tessera.common.cli_args import add_config_args, config_from_args, env_name, flag_name
from tessera.common.executor_config import ExecutorServerConfig
from tessera.common.generation_config import default_sampling
from tessera.common.preflight import ConfigError, check_port_free, check_readable_file
from tessera.common.registry import ModelSource, resolve_model
from tessera.scheduler.config import SchedulerServerConfig
from tessera.serve import (
    GATEWAY_FIELDS,
    LAUNCHER_FIELDS,
    SCHEDULER_FIELDS,
    TOKENIZER_FIELDS,
    ServeConfig,
    child_commands,
)
from tessera.services.core import sampling_params
from tessera.services.gateway import GatewayConfig
from tessera.services.openai_protocol import ChatCompletionRequest, CompletionRequest
from tessera.tokenizer_svc.__main__ import TOKENIZER_FLAGS
from tessera.tokenizer_svc.server import TokenizerServerConfig
from tests.services.launch import ROOT


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings if s.startswith("--")}


# -- help: every flag the code reads, with help and its variable -----------------------------


@pytest.mark.parametrize("config_cls", [ServeConfig, SchedulerServerConfig,
                                        ExecutorServerConfig, GatewayConfig])
def test_every_config_field_is_a_flag_with_help_and_its_variable(config_cls):
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_config_args(parser, config_cls)
    options = _options(parser)
    for f in dataclasses.fields(config_cls):
        action = options.get(flag_name(f.name))
        assert action is not None, f"{config_cls.__name__}.{f.name} has no flag"
        text = action.help or ""
        described = text.split(" (env ")[0].strip()
        assert described, f"{flag_name(f.name)} has no help text"
        assert f"env {env_name(f.name)}" in text, f"{flag_name(f.name)} does not name its variable"
    assert set(options) - {"--help"} == {
        flag_name(f.name) for f in dataclasses.fields(config_cls)
    } | {"--no-" + flag_name(f.name)[2:] for f in dataclasses.fields(config_cls)
         if f.type in ("bool", bool)}


def test_tessera_serve_parser_is_servconfig_and_every_command_has_help():
    serve = _options(_subparser("serve"))
    assert {"--attention-backend", "--no-cuda-graphs", "--served-model-name",
            "--chat-template", "--generation-config", "--model"} <= set(serve)
    for name in ("serve", "chat", "generate"):
        parser = _subparser(name)
        for action in parser._actions:
            if action.dest != "help":
                assert action.help, f"tessera {name}: {action.dest} has no help"


def test_the_tokenizer_flags_are_its_config_with_help_and_variables():
    names = {f.name for f in dataclasses.fields(TokenizerServerConfig)}
    assert {f.flag.removeprefix("--").replace("-", "_") for f in TOKENIZER_FLAGS} == names
    for f in TOKENIZER_FLAGS:
        assert f.help and f.env.startswith("TESSERA_")


STAGES = [
    ("tessera serve", ServeConfig),
    ("tessera.scheduler", SchedulerServerConfig),
    ("tessera.executor", ExecutorServerConfig),
    ("tessera.services", GatewayConfig),
    ("tessera.tokenizer_svc", TokenizerServerConfig),
]


@pytest.mark.parametrize("module,config_cls", STAGES)
def test_help_as_printed_lists_every_field_and_abbreviations_are_refused(module, config_cls):
    """What a user reads: `--help` of each entry point, in a real interpreter."""
    cmd = [sys.executable, "-P", "-m", *module.split()]
    out = subprocess.run([*cmd, "--help"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    listed = set(re.findall(r"--[a-z][a-z0-9-]*", out))
    text = " ".join(out.split())  # argparse wraps lines
    for f in dataclasses.fields(config_cls):
        assert flag_name(f.name) in listed, f"{module} --help lacks {flag_name(f.name)}"
    assert text.count("(env TESSERA_") == len(dataclasses.fields(config_cls))
    if config_cls is not TokenizerServerConfig:  # which names its variables TOKENIZER_*
        for f in dataclasses.fields(config_cls):
            assert f"(env {env_name(f.name)};" in text, f"{module}: {f.name}'s variable"
    # a prefix of a flag is an error, not that flag
    r = subprocess.run([*cmd, "--max-workers" if "tokenizer" in module else "--model",
                        "2", "--grace-second" if "tokenizer" in module else "--mode", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr, r.stderr


def test_max_num_seq_is_not_max_num_seqs():
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "--max-num-seq", "4"])
    assert e.value.code == 2


# -- every serve setting reaches its stage ---------------------------------------------------


def _changed_serve_config() -> ServeConfig:
    return ServeConfig(
        model="smollm2-135m-instruct", served_model_name=("a", "b"), host="127.0.0.2",
        port=50111, http_port=8111, chat_template="{{ messages }}", generation_config="none",
        max_open_requests=7, max_streams_per_connection=3, num_tokenizers=1, device="cpu",
        dtype="float32", block_size=32, max_num_seqs=9, max_num_batched_tokens=512,
        max_model_len=1024, kv_cache_memory=1 << 20, gpu_memory_utilization=0.5,
        kv_cache_dtype="auto", attention_backend="torch", cuda_graphs=False,
        quantization="none", tensor_parallel_size=1, policy="priority",
        async_scheduling=False, enable_prefix_caching=False, max_waiting=5,
        max_waiting_tokens=999, step_timeout=None, heartbeat_timeout=4.0,
        scheduler_timeout=3.0, grace_seconds=2.0,
    )


def test_every_serve_setting_reaches_the_stage_that_reads_it():
    names = {f.name for f in dataclasses.fields(ServeConfig)}
    stages = set(LAUNCHER_FIELDS) | set(GATEWAY_FIELDS) | set(SCHEDULER_FIELDS) | set(
        TOKENIZER_FIELDS)
    assert names == stages, f"read by no stage: {names - stages}"
    config = _changed_serve_config()
    commands = dict(child_commands(config, "/run"))
    for stage, config_cls, passed in (("scheduler", SchedulerServerConfig, SCHEDULER_FIELDS),
                                      ("gateway", GatewayConfig, GATEWAY_FIELDS)):
        parser = argparse.ArgumentParser(allow_abbrev=False)
        add_config_args(parser, config_cls)
        argv = commands[stage][commands[stage].index("-m") + 2:]
        built = config_from_args(config_cls, parser.parse_args(argv), environ={})
        for name in passed:
            assert getattr(built, name) == getattr(config, name), (stage, name)
    tok = commands["tokenizer-0"]
    assert tok[tok.index("--chat-template") + 1] == "{{ messages }}"


def test_served_model_names_from_flags_and_from_the_variable():
    parser = _subparser("serve")
    args = parser.parse_args(["--served-model-name", "a", "b"])
    assert config_from_args(ServeConfig, args, environ={}).served_model_name == ("a", "b")
    env = {"TESSERA_SERVED_MODEL_NAME": "x, y"}
    assert config_from_args(ServeConfig, parser.parse_args([]), environ=env
                            ).served_model_name == ("x", "y")


# -- fail fast ------------------------------------------------------------------------------


def test_a_port_another_server_listens_on_is_refused_even_with_so_reuseport():
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as grpc's default
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 is in use"):
            check_port_free("127.0.0.1", port, "--port")
    check_port_free("127.0.0.1", port, "--port")  # free again once it closed
    check_port_free("127.0.0.1", 0, "--port")


def test_missing_files_and_models_are_named(tmp_path):
    with pytest.raises(ConfigError, match="--tls-cert-file: no such file"):
        check_readable_file(str(tmp_path / "cert.pem"), "--tls-cert-file")
    with pytest.raises(ValueError, match="cannot resolve model"):
        resolve_model(str(tmp_path / "nothing"))


def test_a_model_id_resolves_from_the_local_hugging_face_cache(tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--Org--Tiny"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123\n")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    source = resolve_model("Org/Tiny")
    assert (source.kind, source.path, source.name) == ("hf", str(snapshot), "Org/Tiny")
    with pytest.raises(ValueError, match="local Hugging Face cache"):
        resolve_model("Org/Absent")


# -- default sampling from generation_config.json -----------------------------------------


def test_default_sampling_comes_from_generation_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20,
         "bos_token_id": 1, "eos_token_id": [2, 3]}))
    source = ModelSource(kind="hf", path=str(tmp_path), name="m")
    defaults = default_sampling(source, "auto")
    assert defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    assert default_sampling(source, "none") == {}
    # a request that leaves them unset gets them; its own value wins
    params = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}]
                                   ).to_generation("r", defaults)[0].params
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.9, 20)
    params = CompletionRequest(model="m", prompt="hi", temperature=1.0, top_k=5
                               ).to_generation("r", defaults)[0].params
    assert (params.temperature, params.top_p, params.top_k) == (1.0, 0.9, 5)
    assert sampling_params(None).temperature == 1.0  # the API's default
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert default_sampling(source, "auto") == {"temperature": 0.0}


def test_the_default_model_samples_conservatively_and_random_weights_get_nothing():
    defaults = default_sampling(resolve_model("smollm2-135m-instruct"), "auto")
    assert defaults["temperature"] < 0.5 and defaults["top_p"] < 1.0
    assert default_sampling(resolve_model("random:smollm2-135m"), "auto") == {}


# -- --chat-template ------------------------------------------------------------------------


def test_chat_template_from_a_file_or_inline_replaces_the_models(tmp_path):
    from tessera.tokenizer_svc.chat_template import read_chat_template
    from tessera.tokenizer_svc.server import load_tokenizer

    inline = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    file = tmp_path / "template.jinja"
    file.write_text(inline)
    assert read_chat_template(str(file)) == read_chat_template(inline) == inline
    with pytest.raises(ValueError, match="no such file"):
        read_chat_template(str(tmp_path / "missing.jinja"))
    tokenizer = load_tokenizer("smollm2-135m-instruct", str(file))
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], False) == (
        "<user>hi")
