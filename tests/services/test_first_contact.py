"""What a new user meets first (issue 20), with real processes: a busy port or a bad
model ends ``tessera serve`` at once, before loading, with one line and exit code 2; a
second server on a port the first holds is refused; the routes vLLM users reach for
(/tokenize, /detokenize, /version, /docs) through httpx and the official openai client;
/metrics, read by prometheus_client's parser, holds every ``tessera:`` metric after a
request."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from importlib.metadata import version

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tessera.common.preflight import EXIT_CONFIG
from tests.services.launch import ROOT, Server
from tests.services.test_metric_names import EXPECTED

pytestmark = pytest.mark.slow

FAST_EXIT = 5.0  # seconds: nothing may load before a configuration error is reported


def _serve(*args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, TESSERA_LOG_LEVEL="INFO")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-P", "-m", "tessera", "serve", *args], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=timeout)
    return r, time.monotonic() - t0


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{stderr}"
    return lines[0]


def _listener(reuseport: bool) -> socket.socket:
    s = socket.socket()
    if reuseport:  # as grpc's servers do by default: a second one could share the port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.parametrize("which", ["--port", "--http-port"])
def test_a_busy_port_is_refused_before_loading(which):
    with _listener(reuseport=True) as busy:
        port = busy.getsockname()[1]
        other = "--http-port" if which == "--port" else "--port"
        with _listener(reuseport=False) as spare:  # a free port for the other flag
            free = spare.getsockname()[1]
        r, took = _serve(which, str(port), other, str(free))
    assert r.returncode == EXIT_CONFIG, r.stderr
    assert took < FAST_EXIT
    line = _one_line(r.stderr)
    assert f"{which} " in line and f"port {port} on 127.0.0.1 is in use" in line
    assert "starting" not in r.stderr  # no child was started


def test_a_bad_model_exits_at_once_with_one_line(tmp_path):
    r, took = _serve(str(tmp_path / "no-such-model"), "--port", "0")
    assert r.returncode == EXIT_CONFIG and took < FAST_EXIT, (r.returncode, took)
    assert "cannot resolve model" in _one_line(r.stderr)


def test_the_gateway_alone_refuses_a_busy_port_before_loading(tmp_path):
    with _listener(reuseport=True) as busy:
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        r = subprocess.run(
            [sys.executable, "-P", "-m", "tessera.services", "--port", str(port),
             "--http-port", "0", "--scheduler-address", f"ipc://{tmp_path}/none.sock"],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == EXIT_CONFIG and time.monotonic() - t0 < FAST_EXIT, r.stderr
    assert f"port {port} on 127.0.0.1 is in use" in r.stderr
    assert "waiting for the scheduler" not in r.stderr  # it never got that far


# -- one served model ----------------------------------------------------------------------

NAMES = ("smol", "tessera-default")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("first-contact"),
               env={"TESSERA_SERVED_MODEL_NAME": ",".join(NAMES)})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http_url, timeout=60) as client:
        yield client


def test_a_second_server_on_the_same_port_is_refused(server):
    r, took = _serve("--port", str(server.port), "--http-port", "0")
    assert r.returncode == EXIT_CONFIG and took < FAST_EXIT
    assert f"port {server.port} on 127.0.0.1 is in use" in _one_line(r.stderr)


def test_served_model_names_through_the_openai_client(server):
    client = OpenAI(base_url=f"{server.http_url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == list(NAMES)
    reply = client.chat.completions.create(
        model=NAMES[1], max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
    assert reply.model == NAMES[0] and reply.choices[0].message.content
    with pytest.raises(Exception, match="does not exist|unknown model"):
        client.chat.completions.create(model="smollm2-135m-instruct-x", max_tokens=2,
                                       messages=[{"role": "user", "content": "Hi"}])


def test_tokenize_and_detokenize_agree_with_each_other_and_with_generation(server, http):
    text = "The capital of France is Paris."
    r = http.post("/tokenize", json={"prompt": text})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == len(body["tokens"]) > 3 and body["max_model_len"] > 0
    back = http.post("/detokenize", json={"tokens": body["tokens"], "model": NAMES[0]})
    assert back.status_code == 200 and back.json()["prompt"].strip() == text
    # the chat form counts what a chat completion's usage reports as its prompt
    messages = [{"role": "user", "content": "Name a colour."}]
    chat = http.post("/tokenize", json={"messages": messages}).json()
    done = http.post("/v1/chat/completions", json={"model": NAMES[0], "max_tokens": 2,
                                                   "messages": messages}).json()
    assert chat["count"] == done["usage"]["prompt_tokens"]
    assert http.post("/tokenize", json={"prompt": "x", "bogus": 1}).status_code == 400
    assert http.post("/tokenize", json={"prompt": "x", "model": "nope"}).status_code == 404


def test_version_and_the_openapi_docs(http):
    assert http.get("/version").json() == {"version": version("tessera")}
    docs = http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/tokenize", "/detokenize", "/version"} <= set(paths)


def test_metrics_hold_every_vllm_named_metric_after_a_request(server, http):
    client = OpenAI(base_url=f"{server.http_url}/v1", api_key="unused")
    stream = client.completions.create(model=NAMES[0], prompt="Once upon a time",
                                       max_tokens=6, stream=True, temperature=0)
    assert "".join(c.choices[0].text for c in stream)
    families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    missing = set(EXPECTED) - set(families)
    assert not missing, f"not in /metrics: {missing}"

    def sample(name: str, suffix: str) -> float:
        return sum(s.value for s in families[name].samples if s.name == name + suffix
                   and s.labels.get("model_name") == NAMES[0])

    for histogram in ("tessera:time_to_first_token_seconds", "tessera:e2e_request_latency_seconds",
                      "tessera:request_queue_time_seconds", "tessera:request_prefill_time_seconds",
                      "tessera:request_decode_time_seconds", "tessera:inter_token_latency_seconds"):
        assert sample(histogram, "_count") >= 1, histogram
    assert sample("tessera:request_success", "_total") >= 1
    assert sample("tessera:generation_tokens", "_total") >= 6
    assert 0 <= sample("tessera:kv_cache_usage_perc", "") <= 1
