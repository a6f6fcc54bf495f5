"""The gateway's public surface locked down: an API key on every gRPC method and HTTP
route (enumerated from what the server serves and from the app's router, not listed by
hand), TLS on both ports, mutual TLS, and the tenant's cache salt.

One `tessera serve` with an API key and TLS serves most tests; a second gateway, with
mutual TLS, shares its scheduler and tokenizers (several gateways may share one engine).
Certificates are made here: a throwaway CA signs the server's and a client's; a second
CA, which the servers do not trust, signs an impostor's."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import zmq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tessera.common.curve import is_local
from tessera.common.plan import MAX_CACHE_SALT_BYTES
from tessera.proto.tessera.v1 import engine_pb2
from tessera.proto.tessera.v1 import generate_pb2 as pb
from tessera.scheduler.config import SchedulerServerConfig
from tessera.scheduler.server import SchedulerServer
from tessera.services.core import GenerationRequest, ServingCore, TokenPrompt, sampling_params
from tessera.services.metrics import Metrics
from tessera.services.openai_api import create_app
from tessera.services.security import BearerToken
from tests.proctable import descendants
from tests.scheduler.mirror_executor import InstantLink
from tests.services.launch import ROOT, Server, free_port

# Real processes or whole-model runs: make test-fast leaves these to make test.
pytestmark = pytest.mark.slow

KEY = "sec-key-4b1d"
MODEL = "smollm2-135m-instruct"
AUTH = (("authorization", f"Bearer {KEY}"),)
BAD_AUTH = {  # each must be refused
    "none": (),
    "wrong key": (("authorization", "Bearer not-the-key"),),
    "key with a suffix": (("authorization", f"Bearer {KEY}x"),),
    "key's prefix": (("authorization", f"Bearer {KEY[:-1]}"),),
    "no scheme": (("authorization", KEY),),
    "another scheme": (("authorization", f"Basic {KEY}"),),
    "bearer without a key": (("authorization", "Bearer"),),
}
INFO = engine_pb2.EngineInfo(model="fake", max_model_len=64, vocab_size=100, block_size=4,
                             num_kv_blocks=16, eos_token_ids=[0])  # fmt: skip


# -- certificates ---------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # signed by a CA nobody trusts
    rogue_key: Path

    def ca_bytes(self) -> bytes:
        return self.ca.read_bytes()

    def channel(self, target: str, client: str | None = None) -> grpc.Channel:
        chain = key = None
        if client is not None:
            chain = getattr(self, f"{client}_cert").read_bytes()
            key = getattr(self, f"{client}_key").read_bytes()
        creds = grpc.ssl_channel_credentials(self.ca_bytes(), key, chain)
        return grpc.secure_channel(target, creds)

    def ssl_context(self, client: str | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        if client is not None:
            context.load_cert_chain(getattr(self, f"{client}_cert"),
                                    getattr(self, f"{client}_key"))
        return context


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer: x509.Name | None, issuer_key, *, ca: bool = False,
          server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
    elif server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(directory: Path, name: str, cert: x509.Certificate, key=None) -> tuple[Path, Path]:
    cert_path = directory / f"{name}.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = directory / f"{name}.key"
    if key is not None:
        key_path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))  # fmt: skip
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, rogue_ca_key = _key(), _key()
    ca = _cert("Tessera test CA", ca_key, None, None, ca=True)
    rogue_ca = _cert("Impostor CA", rogue_ca_key, None, None, ca=True)
    server_key, client_key, rogue_key = _key(), _key(), _key()
    ca_path, _ = _write(d, "ca", ca)
    server = _write(d, "server",
                    _cert("localhost", server_key, ca.subject, ca_key, server=True), server_key)
    client = _write(d, "client", _cert("client", client_key, ca.subject, ca_key), client_key)
    rogue = _write(d, "rogue", _cert("rogue", rogue_key, rogue_ca.subject, rogue_ca_key),
                   rogue_key)
    return Pki(ca_path, *server, *client, *rogue)


# -- servers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, pki):
    """`tessera serve`: API key (in the environment) and TLS on both ports."""
    s = Server(
        tmp_path_factory.mktemp("secure"),
        env={"TESSERA_API_KEY": KEY},
        tls_ca=pki.ca_bytes(),
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
    )
    yield s
    s.stop()


@dataclass
class Gateway:
    proc: subprocess.Popen
    target: str
    http_url: str


@pytest.fixture(scope="module")
def mtls_gateway(server, pki):
    """A second gateway on the same engine, requiring client certificates."""
    port, http_port = free_port(), free_port()
    tokenizers = ",".join(f"unix:{server.run_dir}/tokenizer-{i}.sock" for i in range(2))
    cmd = [
        sys.executable, "-P", "-m", "tessera.services", "--model", MODEL,
        "--port", str(port), "--http-port", str(http_port),
        "--scheduler-address", f"ipc://{server.run_dir}/scheduler.sock",
        "--tokenizer-addresses", tokenizers, "--grace-seconds", "5",
        "--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key),
        "--tls-client-ca-file", str(pki.ca),
    ]  # fmt: skip
    env = dict(os.environ, TESSERA_LOG_LEVEL="WARNING")
    env.pop("TESSERA_API_KEY", None)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    gw = Gateway(proc, f"127.0.0.1:{port}", f"https://127.0.0.1:{http_port}")
    try:
        deadline = time.monotonic() + 120
        with pki.channel(gw.target, "client") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                assert proc.poll() is None, f"the gateway exited with {proc.returncode}"
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "the mTLS gateway did not become healthy"
                time.sleep(0.3)
        yield gw
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            for pid in descendants(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()


# -- every RPC, every route --------------------------------------------------------------


def _served_services(server, pki) -> list[str]:
    """Service names, as the server's reflection lists them (with the key)."""
    with pki.channel(server.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(stub.ServerReflectionInfo(iter([request]), metadata=AUTH, timeout=10))
    return [s.name for s in reply.list_services_response.service]


def _call(channel: grpc.Channel, path: str, method, metadata) -> None:
    """One call of any streaming kind with an empty request (raw bytes, no stubs)."""
    kind = {
        (False, False): channel.unary_unary, (False, True): channel.unary_stream,
        (True, False): channel.stream_unary, (True, True): channel.stream_stream,
    }[(method.client_streaming, method.server_streaming)]  # fmt: skip
    request = iter([b""]) if method.client_streaming else b""
    result = kind(path)(request, metadata=metadata, timeout=10)
    if method.server_streaming:
        next(iter(result))  # the first message, or the call's error
        result.cancel()


def test_every_rpc_refuses_a_missing_or_wrong_key(server, pki):
    pool = descriptor_pool.Default()
    served = _served_services(server, pki)
    # Every service in the public proto is served and listed, and nothing unexpected is.
    public = {s.full_name for s in pb.DESCRIPTOR.services_by_name.values()}
    assert public <= set(served)
    assert {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(served)
    refused = []
    with pki.channel(server.target) as ch:
        for name in served:
            service = pool.FindServiceByName(name)
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                for why, metadata in BAD_AUTH.items():
                    try:
                        _call(ch, path, method, metadata)
                        code = grpc.StatusCode.OK
                    except grpc.RpcError as e:
                        code = e.code()
                    if name == "grpc.health.v1.Health":
                        assert code is not grpc.StatusCode.UNAUTHENTICATED, (path, why)
                    else:
                        assert code is grpc.StatusCode.UNAUTHENTICATED, (path, why, code)
                        refused.append(path)
    assert len(set(refused)) == sum(len(pool.FindServiceByName(n).methods) for n in served
                                    if n != "grpc.health.v1.Health")
    # and with the key, a call goes through
    info = pb.ModelInfo.FromString(
        ch_call(server, pki, "/tessera.v1.Tessera/GetModelInfo", pb.GetModelInfoRequest())
    )
    assert info.model == MODEL


def ch_call(server, pki, path: str, request) -> bytes:
    with pki.channel(server.target) as ch:
        return ch.unary_unary(path)(request.SerializeToString(), metadata=AUTH, timeout=10)


def _routes() -> list[tuple[str, str]]:
    """(method, path) of every route of the app, path parameters filled in."""
    core = ServingCore("fake", 1, object(), None, None, INFO, Metrics())
    app = create_app(core, core.metrics, api_key=KEY, max_body_bytes=1 << 20)
    routes = []
    for route in app.routes:
        path = route.path
        while "{" in path:
            start = path.index("{")
            path = path[:start] + "x" + path[path.index("}", start) + 1:]
        routes += [(m, path) for m in sorted(route.methods or ())]
    return routes


def test_every_route_refuses_a_missing_or_wrong_key(server, pki):
    routes = _routes()
    assert {p for _, p in routes} >= {"/health", "/metrics", "/v1/models", "/v1/models/x",
                                      "/v1/completions", "/v1/chat/completions", "/tokenize",
                                      "/detokenize", "/version", "/docs", "/openapi.json"}
    with httpx.Client(base_url=server.http_url, verify=pki.ssl_context(), timeout=30) as http:
        for method, path in routes + [("GET", "/no/such/route")]:
            body = {"model": MODEL} if method == "POST" else None
            for why, headers in BAD_AUTH.items():
                r = http.request(method, path, json=body, headers=dict(headers))
                if path == "/health":
                    assert r.status_code == 200, (method, path, why)
                else:
                    assert r.status_code == 401, (method, path, why, r.status_code)
                    if method != "HEAD":  # (the OpenAPI page answers HEAD: no body)
                        assert r.json()["error"]["code"] == "invalid_api_key"
                    assert r.headers["WWW-Authenticate"] == "Bearer"
            if method == "GET":  # with the key: past the guard (404 for an unknown model)
                assert http.get(path, headers=dict(AUTH)).status_code != 401, path


def test_bearer_token_parsing():
    token = BearerToken(KEY)
    assert token.matches(f"Bearer {KEY}") and token.matches(f"bearer  {KEY} ".encode())
    for _, metadata in BAD_AUTH.items():
        assert not token.matches(metadata[0][1] if metadata else None)


# -- TLS ---------------------------------------------------------------------------------


def test_grpc_over_tls_and_not_in_plaintext(server, pki):
    stub = pb_stub(pki.channel(server.target))
    msgs = list(stub.Generate(pb.GenerateRequest(
        text="The capital of France is",
        sampling=pb.SamplingParameters(temperature=0, max_tokens=4, ignore_eos=True),
    ), metadata=AUTH, timeout=60))  # fmt: skip
    assert sum(len(m.token_ids) for m in msgs) == 4
    for channel in (
        grpc.insecure_channel(server.target),  # plaintext to a TLS port
        grpc.secure_channel(server.target, grpc.ssl_channel_credentials()),  # system CAs
    ):
        with pytest.raises(grpc.RpcError) as err:
            pb_stub(channel).GetModelInfo(pb.GetModelInfoRequest(), metadata=AUTH, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        channel.close()


def pb_stub(channel: grpc.Channel):
    from tessera.proto.tessera.v1 import generate_pb2_grpc

    return generate_pb2_grpc.TesseraStub(channel)


def test_http_over_tls_with_the_openai_client(server, pki):
    with httpx.Client(verify=pki.ssl_context()) as http_client:
        client = openai.OpenAI(base_url=server.http_url + "/v1", api_key=KEY, max_retries=0,
                               http_client=http_client)
        chat = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
            temperature=0, extra_body={"ignore_eos": True},
        )
        assert chat.usage.completion_tokens == 3
    plain = server.http_url.replace("https://", "http://")
    with pytest.raises(httpx.TransportError):
        httpx.get(plain + "/health", timeout=5)
    with pytest.raises(httpx.ConnectError):  # the server's certificate is not trusted
        httpx.get(server.http_url + "/health", timeout=5)


def test_mutual_tls_refuses_clients_without_a_trusted_certificate(mtls_gateway, pki):
    gw = mtls_gateway
    for client in (None, "rogue"):
        with pki.channel(gw.target, client) as ch, pytest.raises(grpc.RpcError) as err:
            pb_stub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(httpx.TransportError):
            httpx.get(gw.http_url + "/v1/models", verify=pki.ssl_context(client), timeout=5)
    with pki.channel(gw.target, "client") as ch:
        assert pb_stub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=10).model == MODEL
    with httpx.Client(verify=pki.ssl_context("client")) as http_client:
        client = openai.OpenAI(base_url=gw.http_url + "/v1", api_key="unused", max_retries=0,
                               http_client=http_client)
        assert [m.id for m in client.models.list().data] == [MODEL]


def test_bad_tls_files_stop_the_gateway_with_a_message(pki, tmp_path):
    cmd = [sys.executable, "-P", "-m", "tessera.services", "--tls-cert-file", str(pki.server_cert),
           "--tls-key-file", str(pki.client_key), "--scheduler-address", "ipc:///nonexistent"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ))
    assert r.returncode != 0 and "cannot use the TLS certificate" in r.stderr
    r = subprocess.run([sys.executable, "-P", "-m", "tessera.services",
                        "--tls-client-ca-file", str(pki.ca)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "needs tls_cert_file" in r.stderr


# -- the tenant's cache salt ------------------------------------------------------------


def test_cache_salt_is_checked_at_the_api(server, pki):
    stub = pb_stub(pki.channel(server.target))
    sampling = pb.SamplingParameters(temperature=0, max_tokens=2, ignore_eos=True)
    msgs = list(stub.Generate(pb.GenerateRequest(text="Hi", sampling=sampling,
                                                 cache_salt="tenant-a"), metadata=AUTH))
    assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(text="Hi", sampling=sampling,
                                              cache_salt="s" * (MAX_CACHE_SALT_BYTES + 1)),
                           metadata=AUTH))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cache_salt" in err.value.details()
    with httpx.Client(verify=pki.ssl_context()) as http_client:
        client = openai.OpenAI(base_url=server.http_url + "/v1", api_key=KEY, max_retries=0,
                               http_client=http_client)
        ok = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2,
                                       extra_body={"cache_salt": "tenant-b"})
        assert ok.usage.completion_tokens >= 1
        with pytest.raises(openai.BadRequestError) as bad:
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=2,
                                      extra_body={"cache_salt": "é" * 200})  # 400 bytes
        assert bad.value.param == "cache_salt"


class _CapturingEngine:
    """Enough of EngineClient for ServingCore.open: it keeps what would go to the scheduler."""

    identity = "gw-test"
    lost_reason = None  # the scheduler is there
    serving = True

    def __init__(self) -> None:
        self.sent: list[engine_pb2.AddSequence] = []

    def open(self, ids):
        return asyncio.Queue()

    def close_ids(self, ids) -> None:
        pass

    async def add(self, seqs) -> None:
        self.sent.extend(seqs)

    async def abort(self, ids) -> None:
        pass


def test_cache_salt_reaches_the_schedulers_request():
    """gateway core -> AddSequence -> the scheduler's Request, in process."""
    engine = _CapturingEngine()
    core = ServingCore("fake", 4, engine, None, None, INFO)

    async def open_one(salt: str) -> None:
        params = sampling_params(max_tokens=2, n=2)
        gen = await core.open(GenerationRequest(TokenPrompt((1, 2, 3)), params, f"r-{salt}",
                                                cache_salt=salt))
        gen.close()

    asyncio.run(open_one("tenant-a"))
    assert [s.cache_salt for s in engine.sent] == ["tenant-a", "tenant-a"]  # both of n=2

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    executor = InstantLink(ctx, INFO.block_size)
    try:
        config = SchedulerServerConfig(block_size=INFO.block_size)
        sched = SchedulerServer(config, INFO, executor, router, threading.Event())
        too_long = engine_pb2.AddSequence(
            request_id="gw/long/0", prompt_token_ids=[1, 2], cache_salt="x" * 257
        )
        for seqs in (engine.sent, [too_long]):
            msg = engine_pb2.GatewayMessage(add=engine_pb2.AddRequests(sequences=seqs))
            sched.handle_message([b"gw", msg.SerializeToString()])
        salts = {r.request_id: r.cache_salt for r in sched.scheduler.waiting}
        assert salts == {s.request_id: "tenant-a" for s in engine.sent}
        rejected = sched.sessions.outbox[b"gw"].rejected
        assert [r.request_id for r in rejected] == ["gw/long/0"] and rejected[0].kind == "invalid"
        assert "cache_salt" in rejected[0].message
    finally:
        executor.socket.close()
        router.close()
        ctx.destroy(linger=0)


def test_launcher_links_stay_local():
    """The launcher's internal links are unix sockets: nothing but the gateway listens
    beyond this machine."""
    from tessera.serve import ServeConfig, child_commands

    for _, cmd in child_commands(ServeConfig(), "/run"):
        for flag in ("--gateway-address", "--executor-address", "--scheduler-address"):
            if flag in cmd:
                assert is_local(cmd[cmd.index(flag) + 1]), cmd
