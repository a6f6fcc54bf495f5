"""The tokenizer service as real processes: replicas started with `python -m tessera.tokenizer_svc`,
reached through the generated stubs and `TokenizerClient`, compared with the in-process
`Tokenizer` and transformers' tokenizer of the same GGUF (the outside reference)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import tokenizers
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tessera.common.preflight import EXIT_CONFIG
from tessera.common.registry import resolve_model
from tessera.proto.tessera.v1 import generate_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from tessera.tokenizer_svc import Tokenizer
from tessera.tokenizer_svc.__main__ import TOKENIZER_FLAGS, add_env_flags
from tessera.tokenizer_svc.client import (
    ChatInput,
    TextInput,
    TokenizerClient,
    TokenizerInputError,
    TokenizerUnavailable,
)
from tessera.tokenizer_svc.server import (
    SERVICE_NAME,
    ChatTurn,
    TokenizerServerConfig,
    tokenize_inputs,
)
from tests.proctable import pid_alive

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never download

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0  # seconds for a replica to load its tokenizer and answer health checks

TEXTS = [
    "Hello, world!",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧‍👦",
    "中文字符测试，日本語のテキスト、한국어 텍스트",
    "   leading spaces, trailing spaces   ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
    "",
    "a" * 300,
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Where is the treasure? 中文 😀"},
        {"role": "assistant", "content": "Arr."},
        {"role": "user", "content": "  spaces  \n\nand newlines\n"},
    ],
]
# A chat template that refuses roles it does not know, as many models' templates do.
STRICT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('role ' ~ m['role'] ~ ' is not supported; use system, user or "
    "assistant') }}{% endif %}{% endfor %}"
)

# Real processes or whole-model runs: make test-fast leaves these to make test.
pytestmark = pytest.mark.slow


# --- processes -----------------------------------------------------------------------------


@dataclass(slots=True)
class Replica:
    process: subprocess.Popen
    address: str
    log: Path
    ready: bool = False

    def wait_serving(self, timeout: float = START_TIMEOUT) -> None:
        """Until the health service says SERVING for the tokenizer service."""
        if self.ready:
            return
        wait_serving(self.address, timeout, lambda: self.process.poll() is None, self.log)
        self.ready = True


@dataclass(slots=True)
class Fleet:
    """Every process a test starts, killed at teardown whatever happened."""

    directory: Path
    processes: list[subprocess.Popen] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)  # grandchildren, by pid

    def start(
        self,
        address: str | None,
        model: str | None = None,
        env: Mapping[str, str] = {},
        grace_seconds: float = 2.0,
    ) -> Replica:
        args = [sys.executable, "-P", "-m", "tessera.tokenizer_svc",
                "--grace-seconds", str(grace_seconds)]
        args += ["--address", address] if address is not None else []
        args += ["--model", model] if model is not None else []
        resolved = address or env["TESSERA_TOKENIZER_ADDRESS"]
        log = self.directory / f"replica-{len(self.processes)}.log"
        with log.open("wb") as stderr:
            process = subprocess.Popen(
                args, cwd=REPO, env={**os.environ, **env}, stdout=stderr, stderr=stderr
            )
        self.processes.append(process)
        return Replica(process, resolved, log)

    def unix_address(self, name: str) -> str:
        return f"unix:{self.directory / name}.sock"

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        for pid in self.pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def wait_serving(address: str, timeout: float, alive: Callable[[], bool], log: Path) -> None:
    options = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 100)]
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert alive(), f"replica at {address} exited:\n{log.read_text()}"
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1)
            except grpc.RpcError:
                time.sleep(0.05)
                continue
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
    pytest.fail(f"replica at {address} not SERVING after {timeout}s:\n{log.read_text()}")


def free_tcp_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    # Short, so unix socket paths stay under the 107-byte limit.
    directory = Path(tempfile.mkdtemp(prefix="tsvc-", dir="/tmp"))
    fleet = Fleet(directory)
    try:
        yield fleet
    finally:
        fleet.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def pair(fleet: Fleet) -> list[Replica]:
    """Two replicas of the default model: one told its address by flag, one by environment.
    Not waited for here, so they load while the test process loads its references."""
    by_flag = fleet.start(fleet.unix_address("a"))
    by_env = fleet.start(
        None,
        env={
            "TESSERA_TOKENIZER_ADDRESS": fleet.unix_address("b"),
            "TESSERA_TOKENIZER_MAX_WORKERS": "1",
        },
    )
    return [by_flag, by_env]


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    tokenizer = Tokenizer.load(resolve_model("smollm2-135m-instruct"))
    assert tokenizer is not None
    return tokenizer


@pytest.fixture(scope="module")
def strict_model(fleet: Fleet, ours: Tokenizer) -> Path:
    """The default model's tokenizer as a Hugging Face directory, with a chat template that
    refuses unknown roles. Loads in a fraction of the GGUF's time."""
    directory = fleet.directory / "strict-model"
    directory.mkdir()
    ours.backend.save(str(directory / "tokenizer.json"))
    config = {**ours.special_tokens, "chat_template": STRICT_TEMPLATE + ours.chat_template}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "config.json").write_text(json.dumps({"eos_token_id": list(ours.eos_token_ids)}))
    return directory


@pytest.fixture(scope="module")
def strict(fleet: Fleet, strict_model: Path) -> Replica:
    """One strict-template replica on TCP."""
    return fleet.start(free_tcp_address(), model=str(strict_model))


def serving(*replicas: Replica) -> list[str]:
    for replica in replicas:
        replica.wait_serving()
    return [replica.address for replica in replicas]


# --- correctness against the references ----------------------------------------------------


def test_text_matches_in_process_and_transformers(pair, ours: Tokenizer, hf_tokenizer):
    async def go():
        async with TokenizerClient(serving(*pair)) as client:
            batch = await client.tokenize([TextInput(text) for text in TEXTS])
            # One call per text, spread over both replicas.
            singles = await asyncio.gather(*(client.tokenize_text(text) for text in TEXTS))
            unspecial = await client.tokenize([TextInput(TEXTS[5], add_special_tokens=False)])
        return batch, singles, unspecial

    batch, singles, unspecial = asyncio.run(go())
    for text, result, single in zip(TEXTS, batch, singles, strict=True):
        assert result.text == text
        assert result.token_ids == single == ours.encode(text) == hf_tokenizer(text)["input_ids"]
    assert batch[5].token_ids[0] == ours.token_to_id("<|im_start|>")  # special text stays whole
    assert unspecial[0].token_ids == ours.encode(TEXTS[5], add_special_tokens=False)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_matches_in_process_and_transformers(
    pair, ours: Tokenizer, hf_tokenizer, add_generation_prompt: bool
):
    async def go():
        async with TokenizerClient(serving(*pair)) as client:
            return await asyncio.gather(
                *(client.tokenize_chat(m, add_generation_prompt) for m in CONVERSATIONS)
            )

    for messages, result in zip(CONVERSATIONS, asyncio.run(go()), strict=True):
        ids, text = result  # a pair, as the gateway unpacks it
        assert (ids, text) == (result.token_ids, result.text)
        kwargs = {"add_generation_prompt": add_generation_prompt}
        reference = hf_tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
        reference_ids = reference["input_ids"] if isinstance(reference, Mapping) else reference
        assert result.text == ours.apply_chat_template(messages, **kwargs)
        assert result.text == hf_tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        assert result.token_ids == reference_ids
        assert result.token_ids == ours.encode(result.text, add_special_tokens=False)
        assert result.token_ids[0] == ours.bos_token_id != result.token_ids[1]  # BOS once
        assert result.text.endswith("<|im_start|>assistant\n") is add_generation_prompt


def test_chat_never_gets_a_second_bos(ours: Tokenizer):
    """With a model whose encoding adds BOS, a chat whose template writes BOS keeps one."""
    backend = tokenizers.Tokenizer.from_str(ours.backend.to_str())
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", ours.bos_token_id)]
    )
    with_bos = dataclasses.replace(ours, backend=backend, name="with-bos")
    turns = (ChatTurn("user", "hi"),)
    text, chat, chat_special = tokenize_inputs(
        with_bos,
        [TextInput("hi"), ChatInput(turns), ChatInput(turns, add_special_tokens=True)],
    )
    bos = ours.bos_token_id
    assert text.token_ids == [bos, *ours.encode("hi")]
    assert chat.token_ids == chat_special.token_ids == ours.encode(chat.text)
    assert chat.token_ids[0] == bos != chat.token_ids[1]


def test_detokenize_round_trip_and_special_tokens(pair, ours: Tokenizer):
    batch = [ours.encode(text) for text in TEXTS]

    async def go():
        async with TokenizerClient(serving(*pair)) as client:
            skipped = await client.detokenize_batch(batch)
            kept = await client.detokenize_batch(batch, skip_special_tokens=False)
            single = await client.detokenize(batch[2])
        return skipped, kept, single

    skipped, kept, single = asyncio.run(go())
    assert kept == TEXTS  # every text here is spelled exactly by the vocabulary
    assert skipped == [ours.decode(ids) for ids in batch]
    assert skipped[5] == "user\nWhat is 2+2?\n"  # <|im_start|> and <|im_end|> dropped
    assert single == TEXTS[2]


def test_info_fields(pair, ours: Tokenizer, hf_tokenizer):
    async def go():
        async with TokenizerClient(serving(*pair)) as client:
            return await asyncio.gather(client.info(), client.info())

    for info in asyncio.run(go()):  # both replicas
        assert info.model == "smollm2-135m-instruct"
        assert info.vocab_size == ours.vocab_size == len(hf_tokenizer) == 49152
        assert info.eos_token_ids == (hf_tokenizer.eos_token_id,) == (2,)
        assert info.bos_token_id == hf_tokenizer.bos_token_id == 1
        assert info.has_chat_template is True


# --- bad input -----------------------------------------------------------------------------


def _tokenize_request(*inputs: tokenizer_pb2.TokenizeInput) -> tokenizer_pb2.TokenizeBatchRequest:
    return tokenizer_pb2.TokenizeBatchRequest(inputs=inputs)


def _chat(*turns: tuple[str, str]) -> tokenizer_pb2.TokenizeInput:
    messages = [generate_pb2.ChatMessage(role=role, content=content) for role, content in turns]
    return tokenizer_pb2.TokenizeInput(chat=generate_pb2.ChatMessages(messages=messages))


def test_bad_input_is_invalid_argument_and_the_server_keeps_answering(strict, ours: Tokenizer):
    (address,) = serving(strict)
    text = tokenizer_pb2.TokenizeInput(text="still here")
    bad_requests = {
        "sets neither 'text' nor 'chat'": _tokenize_request(text, tokenizer_pb2.TokenizeInput()),
        "chat input has no messages": _tokenize_request(_chat()),
        "messages[1] has an empty role": _tokenize_request(_chat(("user", "a"), ("", "b"))),
        "role tool is not supported; use system, user or assistant": _tokenize_request(
            _chat(("user", "hi"), ("tool", "{}"))
        ),
    }
    with grpc.insecure_channel(address) as channel:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        for message, request in bad_requests.items():
            with pytest.raises(grpc.RpcError) as error:
                stub.Tokenize(request, timeout=5)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
            assert message in error.value.details()
        ids = generate_pb2.TokenIds(ids=[1, 49152])
        with pytest.raises(grpc.RpcError) as error:
            stub.Detokenize(tokenizer_pb2.DetokenizeBatchRequest(inputs=[ids]), timeout=5)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "token id 49152 is outside the vocabulary" in error.value.details()
        # Over the 16 MiB receive limit: refused, not a crash.
        huge = tokenizer_pb2.TokenizeInput(text="a" * (17 * 1024 * 1024))
        with pytest.raises(grpc.RpcError) as error:
            stub.Tokenize(_tokenize_request(huge), timeout=10)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        reply = stub.Tokenize(_tokenize_request(text), timeout=5)
        assert list(reply.outputs[0].token_ids) == ours.encode("still here")

    async def through_the_client():
        async with TokenizerClient([address]) as client:
            with pytest.raises(TokenizerInputError, match="role tool is not supported"):
                await client.tokenize_chat([{"role": "tool", "content": "{}"}])
            with pytest.raises(TokenizerInputError, match="outside the vocabulary"):
                await client.detokenize([10**6])
            with pytest.raises(TokenizerInputError, match="only 'role' and 'content'"):
                await client.tokenize_chat([{"role": "user", "content": "x", "name": "bob"}])
            with pytest.raises(TokenizerInputError, match="ints in"):
                await client.detokenize([-1])
            return await client.tokenize_text("still here")

    assert asyncio.run(through_the_client()) == ours.encode("still here")


# --- health and reflection -----------------------------------------------------------------


def test_health_and_reflection(pair):
    address = serving(*pair)[1]
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as error:
            health.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=5)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(reflection.ServerReflectionInfo(iter([request]), timeout=5))
        names = {service.name for service in reply.list_services_response.service}
        assert {"tessera.internal.v1.TokenizerService", "grpc.health.v1.Health"} <= names
        symbol = reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)
        (reply,) = list(reflection.ServerReflectionInfo(iter([symbol]), timeout=5))
        assert reply.file_descriptor_response.file_descriptor_proto  # the schema itself


# --- failures of replicas ------------------------------------------------------------------


def test_client_rides_over_a_killed_replica_then_reports_all_down(
    fleet: Fleet, strict_model: Path, ours: Tokenizer, caplog
):
    victim, survivor = (
        fleet.start(fleet.unix_address(name), model=str(strict_model)) for name in ("k0", "k1")
    )
    addresses = serving(victim, survivor)
    texts = [f"request {i}: {TEXTS[i % len(TEXTS)]}" for i in range(50)]
    timeout = 10.0

    async def go():
        async with TokenizerClient(addresses, timeout=timeout) as client:
            done = 0
            limit = asyncio.Semaphore(4)  # a few calls in flight when the kill lands

            async def one(text: str) -> list[int]:
                nonlocal done
                async with limit:
                    ids = await client.tokenize_text(text)
                done += 1
                if done == 10:
                    victim.process.send_signal(signal.SIGKILL)
                return ids

            results = await asyncio.gather(*(one(text) for text in texts))
            assert victim.process.wait(5) == -signal.SIGKILL
            after = [await client.tokenize_text(text) for text in texts[:6]]

            survivor.process.send_signal(signal.SIGTERM)
            assert survivor.process.wait(10) == 0  # graceful stop exits 0
            start = time.monotonic()
            with pytest.raises(TokenizerUnavailable, match="no tokenizer replica answered"):
                await client.tokenize_text("anyone?")
            return results, after, time.monotonic() - start

    results, after, failing_took = asyncio.run(go())
    assert results == [ours.encode(text) for text in texts]
    assert after == [ours.encode(text) for text in texts[:6]]
    assert f"tokenizer replica {victim.address} is down" in caplog.text  # failover happened
    assert failing_took < timeout / 5


def test_sigterm_with_a_call_in_flight_finishes_it_and_exits_0(
    fleet: Fleet, strict_model: Path, ours: Tokenizer
):
    replica = fleet.start(fleet.unix_address("t"), model=str(strict_model), grace_seconds=10)
    (address,) = serving(replica)
    big = ["word " * 150_000] * 4  # about a second of work: SIGTERM lands while it runs

    async def go():
        async with TokenizerClient([address], timeout=20) as client:
            call = asyncio.ensure_future(client.tokenize([TextInput(t) for t in big]))
            await asyncio.sleep(0.3)
            assert not call.done()
            replica.process.send_signal(signal.SIGTERM)
            return await call

    results = asyncio.run(go())
    assert [r.token_ids for r in results] == [ours.encode(big[0])] * 4
    assert replica.process.wait(10) == 0
    log = replica.log.read_text()
    assert log.index("stopping; in-flight calls have") < log.index("stopped")


def test_replica_exits_when_its_parent_dies(fleet: Fleet, strict_model: Path):
    address = fleet.unix_address("orphan")
    launcher = (
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-P', '-m', 'tessera.tokenizer_svc', "
        f"'--address', "
        f"{address!r}, '--model', {str(strict_model)!r}])\n"
        "print(child.pid, flush=True)\n"
        "child.wait()\n"
    )
    log = fleet.directory / "orphan.log"
    with log.open("wb") as stderr:
        parent = subprocess.Popen(
            [sys.executable, "-c", launcher], cwd=REPO, stdout=subprocess.PIPE, stderr=stderr
        )
    fleet.processes.append(parent)
    pid = int(parent.stdout.readline())
    fleet.pids.append(pid)
    wait_serving(address, START_TIMEOUT, lambda: pid_alive(pid), log)

    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid), f"replica {pid} outlived its parent:\n{log.read_text()}"
    assert "stopped" in log.read_text()  # it shut down gracefully, not by a kill


def test_a_taken_address_is_refused_not_shared(fleet: Fleet, pair, strict, strict_model: Path):
    taken = serving(pair[0], strict)
    duplicates = [fleet.start(address, model=str(strict_model)) for address in taken]
    for duplicate in duplicates:
        assert duplicate.process.wait(START_TIMEOUT) == EXIT_CONFIG  # never restarted
        assert f"cannot listen on {duplicate.address}" in duplicate.log.read_text()
    for replica in (pair[0], strict):  # the first owners still answer
        replica.ready = False
        replica.wait_serving(timeout=5)


# --- configuration -------------------------------------------------------------------------


def test_flags_win_over_environment_which_wins_over_defaults(capsys):
    import argparse

    def parse(argv: list[str], environ: dict[str, str]) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        add_env_flags(parser, TOKENIZER_FLAGS, environ)
        return parser.parse_args(argv)

    environ = {"TESSERA_MODEL": "/models/x.gguf", "TESSERA_TOKENIZER_MAX_WORKERS": "3"}
    args = parse(["--max-workers", "4"], environ)
    assert (args.model, args.max_workers) == ("/models/x.gguf", 4)  # env, then flag
    assert (args.address, args.grace_seconds) == ("127.0.0.1:50061", 5.0)  # defaults
    assert parse([], environ).max_workers == 3
    with pytest.raises(SystemExit) as exit_:
        parse([], {"TESSERA_TOKENIZER_GRACE_SECONDS": "soon"})
    assert exit_.value.code == 2
    assert "TESSERA_TOKENIZER_GRACE_SECONDS='soon' is not a valid float" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_workers": 0}, "max_workers must be a positive int"),
        ({"grace_seconds": -1.0}, "grace_seconds must be a finite number"),
        ({"address": "localhost"}, "neither host:port"),
        ({"address": "127.0.0.1:70000"}, "neither host:port"),
        ({"address": "unix:"}, "names no socket path"),
        ({"address": "unix:/" + "d" * 200}, "longer than 107 bytes"),
        ({"model": " "}, "must name a model"),
    ],
)
def test_config_is_validated(overrides: dict, message: str):
    with pytest.raises(ValueError, match=message):
        TokenizerServerConfig(**overrides)
    assert TokenizerServerConfig(address="[::1]:0").address == "[::1]:0"


def test_the_service_imports_no_torch():
    code = (
        "import sys, tokenizer_svc.__main__, tokenizer_svc.client, tokenizer_svc.server\n"
        "assert 'torch' not in sys.modules, 'tokenizer_svc imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
