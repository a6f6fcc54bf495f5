"""The product as users meet it: `tessera serve` starts real processes (2 tokenizer
replicas, scheduler + executor, gateway) and we talk to them through the generated
stubs. The offline engine (itself checked against transformers) is the reference."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest

from tessera import LLM, SamplingParams
from tessera.proto.tessera.v1 import generate_pb2 as pb
from tessera.proto.tessera.v1 import generate_pb2_grpc as pb_grpc
from tests.proctable import cmdline, descendants, pid_alive
from tests.services.launch import PROMPTS, Server

# Real processes or whole-model runs: make test-fast leaves these to make test.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def offline() -> LLM:
    return LLM("smollm2-135m-instruct", device="cpu", show_progress=False)


def greedy(max_tokens: int) -> pb.SamplingParameters:
    return pb.SamplingParameters(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def collect(responses) -> tuple[list[int], str, list[pb.GenerateResponse]]:
    msgs = list(responses)
    ids = [t for m in msgs for t in m.token_ids]
    return ids, "".join(m.text for m in msgs), msgs


def test_stream_equals_offline_generate(server, offline):
    stub = server.stub()
    for prompt in PROMPTS[:3]:
        ids, text, msgs = collect(
            stub.Generate(pb.GenerateRequest(text=prompt, sampling=greedy(24)))
        )
        ref = offline.generate(
            [prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False
        )[0]
        assert ids == ref.outputs[0].token_ids
        assert text == ref.outputs[0].text
        assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert msgs[-1].usage.completion_tokens == 24
        assert msgs[-1].usage.prompt_tokens == len(ref.prompt_token_ids)
        assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])


def test_chat_and_stop_strings(server, offline):
    stub = server.stub()
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Tell me about cats.")])
    ids, text, _ = collect(stub.Generate(pb.GenerateRequest(chat=chat, sampling=greedy(30))))
    ref = offline.chat(
        [{"role": "user", "content": "Tell me about cats."}],
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
        use_tqdm=False,
    )[0]
    assert ids == ref.outputs[0].token_ids and text == ref.outputs[0].text
    stop = " " + text.split()[3]
    sp = greedy(30)
    sp.stop.append(stop)
    _, cut_text, msgs = collect(stub.Generate(pb.GenerateRequest(chat=chat, sampling=sp)))
    assert cut_text == text[: text.index(stop)]
    assert msgs[-1].finish_reason == pb.FINISH_REASON_STOP and msgs[-1].stop_text == stop


def mixed_requests(n: int) -> list[tuple[str, int]]:
    return [(PROMPTS[i % len(PROMPTS)] + " " * (i % 3), 4 + (i * 7) % 29) for i in range(n)]


async def _stream(stub, prompt: str, max_tokens: int, cancel_after: int | None = None):
    call = stub.Generate(pb.GenerateRequest(text=prompt, sampling=greedy(max_tokens)))
    ids = []
    async for msg in call:
        ids.extend(msg.token_ids)
        if cancel_after is not None and len(ids) >= cancel_after:
            call.cancel()
            return None
    return ids


def references(offline: LLM, reqs: list[tuple[str, int]]) -> list[list[int]]:
    outs = offline.generate(
        [p for p, _ in reqs],
        [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in reqs],
        use_tqdm=False,
    )
    return [o.outputs[0].token_ids for o in outs]


def test_64_concurrent_streams(server, offline):
    reqs = mixed_requests(64)

    async def run():
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.TesseraStub(ch)
            return await asyncio.gather(*(_stream(stub, p, m) for p, m in reqs))

    got = asyncio.run(run())
    assert got == references(offline, reqs)


def test_cancelled_streams_free_their_blocks(server, offline):
    reqs = mixed_requests(40)
    reqs = [(p, m + 20) for p, m in reqs]  # long enough to cancel mid-way
    cancel = set(range(0, 40, 4))  # 10 of 40

    async def run():
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.TesseraStub(ch)
            return await asyncio.gather(
                *(
                    _stream(stub, p, m, cancel_after=3 if i in cancel else None)
                    for i, (p, m) in enumerate(reqs)
                )
            )

    got = asyncio.run(run())
    refs = references(offline, reqs)
    for i, (g, r) in enumerate(zip(got, refs, strict=True)):
        if i in cancel:
            assert g is None
        else:
            assert g == r, f"stream {i} was disturbed by the cancellations"
    stub = server.stub()
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    deadline = time.monotonic() + 10
    while True:
        load = stub.GetLoad(pb.GetLoadRequest())
        if load.num_kv_blocks_free == info.num_kv_blocks or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert load.num_kv_blocks_used == 0 and load.num_kv_blocks_free == info.num_kv_blocks
    assert load.num_running == 0 and load.num_waiting == 0


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda info: pb.GenerateRequest(text="hi", model="no-such-model"), "unknown model"),
        (lambda info: pb.GenerateRequest(), "no input"),
        (lambda info: pb.GenerateRequest(text=""), "empty"),
        (
            lambda info: pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, info.vocab_size + 3])),
            "vocabulary",
        ),
        (
            lambda info: pb.GenerateRequest(token_ids=pb.TokenIds(ids=[100] * info.max_model_len)),
            "max_model_len",
        ),
        (
            lambda info: pb.GenerateRequest(
                text="hi", sampling=pb.SamplingParameters(temperature=-1)
            ),
            "temperature",
        ),
        (
            lambda info: pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(top_p=1.5)),
            "top_p",
        ),
        (
            lambda info: pb.GenerateRequest(
                text="hi", sampling=pb.SamplingParameters(max_tokens=0)
            ),
            "max_tokens",
        ),
        (
            lambda info: pb.GenerateRequest(
                text="hi", sampling=pb.SamplingParameters(logprobs=1000)
            ),
            "logprobs",
        ),
        (lambda info: pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(n=1000)), "n "),
    ],
)
def test_bad_input_is_invalid_argument_and_server_keeps_serving(server, make, needle):
    stub = server.stub()
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(make(info)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.details()
    ids, _, _ = collect(stub.Generate(pb.GenerateRequest(text="Still there?", sampling=greedy(2))))
    assert len(ids) == 2


def test_unary_rpcs(server, offline):
    stub = server.stub()
    tok = offline.get_tokenizer()
    r = stub.Tokenize(pb.TokenizeRequest(text="Hello, world!"))
    assert list(r.token_ids) == tok.encode("Hello, world!")
    assert stub.Detokenize(pb.DetokenizeRequest(token_ids=r.token_ids)).text == "Hello, world!"
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.vocab_size == offline.model_config.vocab_size and info.block_size == 16
    assert info.num_kv_blocks > 0 and list(info.eos_token_ids) == list(
        offline.model_config.eos_token_ids
    )
    assert stub.Abort(pb.AbortRequest(request_id="nope")).found is False


def test_a_tokenizer_replica_dying_fails_no_request(server):
    tokenizers = [p for p in descendants(server.proc.pid) if "tokenizer_svc" in cmdline(p)]
    assert len(tokenizers) == 2
    os.kill(tokenizers[0], signal.SIGKILL)
    stub = server.stub()
    for i in range(10):
        ids, _, _ = collect(
            stub.Generate(pb.GenerateRequest(text=f"Count to {i}:", sampling=greedy(2)))
        )
        assert len(ids) == 2


def test_sigterm_lets_streams_finish_then_everything_exits_0(server, offline):
    """Runs last: it stops the module's server."""
    started = descendants(server.proc.pid)
    assert len(started) >= 5  # 2 tokenizers, scheduler, executor, gateway
    stub = server.stub()
    call = stub.Generate(pb.GenerateRequest(text=PROMPTS[0], sampling=greedy(40)))
    first = next(call)
    server.proc.send_signal(signal.SIGTERM)
    rest = list(call)
    ids = list(first.token_ids) + [t for m in rest for t in m.token_ids]
    ref = offline.generate(
        [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False
    )[0]
    assert ids == ref.outputs[0].token_ids
    assert server.proc.wait(60) == 0
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in started if pid_alive(p)], "orphan processes left behind"
