"""The OpenAI-compatible HTTP API as users meet it: `tessera serve` (real processes)
with an API key, called through the official openai package (sync and async) and raw
httpx. References from outside the HTTP front: the gRPC API's output for the same
greedy request (text, token counts, logprobs), the openai client's own parsing, and
the scheduler's KV pool and abort counters."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import httpx
import openai
import pytest

from tessera.proto.tessera.v1 import generate_pb2 as pb
from tests.services.launch import Server

# Real processes or whole-model runs: make test-fast leaves these to make test.
pytestmark = pytest.mark.slow

KEY = "test-key-7f3a"
MODEL = "smollm2-135m-instruct"
MAX_OPEN = 4  # the gateway's max_open_requests, small enough to reach in a test
GRPC_AUTH = (("authorization", f"Bearer {KEY}"),)
CHAT = [{"role": "user", "content": "Tell me about cats."}]
PROMPT = "The capital of France is"
IGNORE_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # The key through the environment, as a deployment would pass it.
    s = Server(
        tmp_path_factory.mktemp("openai"),
        env={"TESSERA_API_KEY": KEY},
        max_open_requests=MAX_OPEN,
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(
        base_url=server.http_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as c:
        yield c


def grpc_generate(server, max_tokens: int, logprobs: int | None = None, **input_):
    sampling = pb.SamplingParameters(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    if logprobs is not None:
        sampling.logprobs = logprobs
    msgs = list(
        server.stub().Generate(pb.GenerateRequest(sampling=sampling, **input_), metadata=GRPC_AUTH)
    )
    return "".join(m.text for m in msgs), msgs


def grpc_chat(server, max_tokens: int, logprobs: int | None = None):
    chat = pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in CHAT])
    return grpc_generate(server, max_tokens, logprobs, chat=chat)


def metric(http: httpx.Client, name: str) -> float:
    """An unlabelled series' value from /metrics."""
    for line in http.get("/metrics").text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    raise KeyError(name)


def wait_pool_whole(server, timeout: float = 15.0) -> pb.Load:
    stub = server.stub()
    deadline = time.monotonic() + timeout
    while True:
        load = stub.GetLoad(pb.GetLoadRequest(), metadata=GRPC_AUTH)
        if load.num_kv_blocks_used == 0 or time.monotonic() > deadline:
            return load
        time.sleep(0.1)


# -- the basics ---------------------------------------------------------------------------


def test_models_health_and_keys(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    # /health needs no key; everything else does, on both fronts.
    assert httpx.get(server.http_url + "/health").json() == {"status": "ok"}
    for key in ("wrong-key", KEY + "x", KEY[:-1]):
        bad = openai.OpenAI(base_url=server.http_url + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            bad.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)
        assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    for path in ("/v1/models", "/metrics", "/v1/no-such-route"):
        r = httpx.get(server.http_url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(server.http_url + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert r.status_code == 401
    with pytest.raises(grpc.RpcError) as err:
        server.stub().GetLoad(pb.GetLoadRequest())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_greedy_text_equals_grpc_streamed_or_not(server, client):
    ref_chat, msgs = grpc_chat(server, 16)
    ref_usage = msgs[-1].usage
    chat = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=16, temperature=0, extra_body=IGNORE_EOS
    )
    (choice,) = chat.choices
    assert choice.message.content == ref_chat and choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert chat.usage.prompt_tokens == ref_usage.prompt_tokens
    assert chat.usage.completion_tokens == 16 == ref_usage.completion_tokens
    assert chat.usage.total_tokens == ref_usage.prompt_tokens + 16
    assert chat.id.startswith("chatcmpl-") and chat.object == "chat.completion"

    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=CHAT, max_completion_tokens=16, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body=IGNORE_EOS,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref_chat
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1

    ref_text, _ = grpc_generate(server, 12, text=PROMPT)
    done = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, extra_body=IGNORE_EOS
    )
    assert done.choices[0].text == ref_text and done.choices[0].finish_reason == "length"
    streamed = list(
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
            extra_body=IGNORE_EOS,
        )
    )
    assert "".join(c.choices[0].text for c in streamed) == ref_text
    assert streamed[-1].choices[0].finish_reason == "length"


def test_stop_strings_and_natural_stop(server, client):
    full = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, extra_body=IGNORE_EOS
    ).choices[0].text
    stop = " " + full.split()[2]
    assert stop in full
    cut = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop, "@@@"]
    ).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=16, temperature=0, stop=stop, stream=True
        )
    )
    ref_chat, _ = grpc_chat(server, 16)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    expected = ref_chat[: ref_chat.index(stop)] if stop in ref_chat else ref_chat
    assert text == expected
    # Without ignore_eos a short answer ends on EOS: finish reason "stop", fewer tokens.
    short = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say just: yes"}], max_tokens=40,
        temperature=0,
    )
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 40


def test_n2_and_seed_reproducibility(client):
    def ask(seed: int, stream: bool = False) -> list[str]:
        kwargs = dict(model=MODEL, messages=CHAT, max_tokens=8, temperature=1.0, n=2, seed=seed,
                      extra_body=IGNORE_EOS)
        if not stream:
            r = client.chat.completions.create(**kwargs)
            assert [c.index for c in r.choices] == [0, 1]
            assert r.usage.completion_tokens == 16
            assert all(c.finish_reason == "length" for c in r.choices)
            return [c.message.content for c in r.choices]
        texts = ["", ""]
        for chunk in client.chat.completions.create(**kwargs, stream=True):
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
        return texts

    first = ask(1234)
    assert first[0] != first[1]  # each sequence has its own seed
    assert ask(1234) == first
    assert ask(1234, stream=True) == first
    assert any(ask(seed) != first for seed in (1, 2))
    two = client.completions.create(
        model=MODEL, prompt=[PROMPT, "1 2 3"], n=2, max_tokens=4, temperature=0,
        extra_body=IGNORE_EOS,
    )
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.choices[0].text == two.choices[1].text != two.choices[2].text
    assert two.usage.completion_tokens == 16


def test_logprobs_equal_grpc(server, client):
    _, msgs = grpc_chat(server, 6, logprobs=3)
    ref = [lp for m in msgs for lp in m.logprobs]
    r = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
        extra_body=IGNORE_EOS,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == len(ref) == 6
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for got, want in zip(content, ref, strict=True):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
        assert bytes(got.bytes).decode() == got.token
        assert [t.logprob for t in got.top_logprobs] == pytest.approx(
            [t.logprob for t in want.top], abs=1e-5
        )
        assert got.top_logprobs[0].token == got.token  # greedy: the sampled token is the best

    _, msgs = grpc_generate(server, 5, logprobs=2, text=PROMPT)
    ref = [lp for m in msgs for lp in m.logprobs]
    c = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2,
        extra_body=IGNORE_EOS,
    ).choices[0]
    lp = c.logprobs
    assert "".join(lp.tokens) == c.text
    assert lp.token_logprobs == pytest.approx([x.logprob for x in ref], abs=1e-5)
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]


def test_echo(server, client, http):
    c = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True
    ).choices[0]
    plain = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0
    ).choices[0]
    assert c.text == PROMPT + plain.text
    tokenized = server.stub().Tokenize(pb.TokenizeRequest(text=PROMPT), metadata=GRPC_AUTH)
    ids = list(tokenized.token_ids)
    by_ids = http.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": ids, "max_tokens": 4, "temperature": 0, "echo": True},
    ).json()
    assert by_ids["choices"][0]["text"] == PROMPT + plain.text


def test_async_client_concurrent_requests(server, client):
    async def run():
        async with openai.AsyncOpenAI(
            base_url=server.http_url + "/v1", api_key=KEY, max_retries=0
        ) as aclient:

            async def chat(content: str) -> str:
                r = await aclient.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": content}],
                    max_tokens=6, temperature=0, extra_body=IGNORE_EOS,
                )
                return r.choices[0].message.content

            async def streamed(prompt: str) -> str:
                out = ""
                async for chunk in await aclient.completions.create(
                    model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True,
                    extra_body=IGNORE_EOS,
                ):
                    out += chunk.choices[0].text
                return out

            return await asyncio.gather(chat("Hi"), chat("Name a color."), streamed(PROMPT))

    got = asyncio.run(run())
    want = [
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=6,
            temperature=0, extra_body=IGNORE_EOS,
        ).choices[0].message.content
        for q in ("Hi", "Name a color.")
    ]
    assert got[:2] == want
    assert got[2] == grpc_generate(server, 6, text=PROMPT)[0]


# -- errors ---------------------------------------------------------------------------------


def _chat(**extra) -> dict:
    return {"model": MODEL, "messages": CHAT, "max_tokens": 2, **extra}


@pytest.mark.parametrize(
    "path, body, status, param, needle",
    [
        ("/v1/chat/completions", _chat(temperature=2.5), 400, "temperature", "temperature"),
        ("/v1/chat/completions", _chat(n=0), 400, "n", "n must be"),
        ("/v1/chat/completions", _chat(max_tokens=0), 400, "max_tokens", "max_tokens"),
        ("/v1/chat/completions", _chat(max_tokens="many"), 400, "max_tokens", "integer"),
        ("/v1/chat/completions", _chat(top_p=0), 400, "top_p", "top_p"),
        ("/v1/chat/completions", _chat(top_logprobs=3), 400, "top_logprobs", "logprobs"),
        ("/v1/chat/completions", _chat(logit_bias={"x": 1}), 400, "logit_bias", "token ids"),
        ("/v1/chat/completions", _chat(logit_bias={"10": 500}), 400, "logit_bias", "[-100"),
        ("/v1/chat/completions", _chat(functions=[]), 400, "functions", "unrecognized"),
        ("/v1/chat/completions", _chat(tool_choice="required"), 400, "tool_choice", "tools"),
        ("/v1/chat/completions", _chat(response_format={"type": "json_schema"}), 400,
         "response_format", "json_schema"),
        ("/v1/chat/completions", _chat(stream_options={"include_usage": True}), 400,
         "stream_options", "stream"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages", "no messages"),
        ("/v1/chat/completions", {"model": MODEL}, 400, "messages", "required"),
        ("/v1/chat/completions", _chat(model="gpt-4o"), 404, "model", "unknown model"),
        ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt", "empty"),
        ("/v1/completions", {"model": MODEL, "prompt": [1, 10**6]}, 400, "prompt", "vocabulary"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 10**6}, 400,
         "max_tokens", "max_model_len"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "echo": True, "logprobs": 1}, 400,
         "echo", "echo"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "seed": -1}, 400, "seed", "seed"),
        ("/v1/completions", b'{"model": "x", "prompt":', 400, None, "JSON"),
        ("/v1/completions", b'[1, 2]', 400, None, "object"),
        ("/v1/completions", b'{"prompt": "' + b"a" * (5 << 20) + b'"}', 413, None, "bytes"),
        ("/v1/no-such-route", {}, 404, None, "no route"),
    ],
)
def test_errors_have_openai_shape_and_status(http, path, body, status, param, needle):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and needle in error["message"]
    assert error["type"] == "invalid_request_error"


def test_errors_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=9)
    assert err.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no-such-model", prompt="hi")
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):  # refused before the stream starts
        client.chat.completions.create(model=MODEL, messages=CHAT, n=99, stream=True)
    # the server keeps serving
    ok = client.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens >= 1


# -- load, aborts, metrics ----------------------------------------------------------------


def test_closing_a_stream_or_timing_out_aborts_and_frees_blocks(server, client, http):
    aborted = metric(http, "tessera_engine_requests_aborted_total")
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=2000, temperature=0, stream=True,
        extra_body=IGNORE_EOS,
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert server.stub().GetLoad(pb.GetLoadRequest(), metadata=GRPC_AUTH).num_kv_blocks_used > 0
    stream.close()
    load = wait_pool_whole(server)
    assert load.num_kv_blocks_used == 0 and load.num_running == 0
    assert metric(http, "tessera_engine_requests_aborted_total") == aborted + 1
    # A client that gives up on a non-streamed request aborts it too.
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=1.5).completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=2000, extra_body=IGNORE_EOS
        )
    load = wait_pool_whole(server)
    assert load.num_kv_blocks_used == 0 and load.num_running == 0
    assert metric(http, "tessera_engine_requests_aborted_total") == aborted + 2


def test_full_gateway_answers_429_with_retry_after(server, client, http):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2000, "stream": True,
            "ignore_eos": True}
    with httpx.Client(
        base_url=server.http_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as c:
        streams = [c.stream("POST", "/v1/completions", json=body) for _ in range(MAX_OPEN)]
        responses = [s.__enter__() for s in streams]
        try:
            assert [r.status_code for r in responses] == [200] * MAX_OPEN
            # Keep the line iterators: dropping one closes its connection (an abort).
            lines = [r.iter_lines() for r in responses]
            for it in lines:
                assert next(it).startswith("data: ")  # the stream has begun: it is open
            r = http.post("/v1/completions", json={**body, "stream": False})
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "overloaded"
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    assert wait_pool_whole(server).num_kv_blocks_used == 0
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=1).choices


def test_metrics(http):
    text = http.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    assert metric(http, "tessera_engine_up") == 1
    assert metric(http, "tessera_kv_blocks_total") > 0
    assert metric(http, "tessera_time_to_first_token_seconds_count") > 0
    assert metric(http, "tessera_e2e_request_latency_seconds_count") > 0
    assert metric(http, "tessera_generation_tokens_total") > 0
    lines = http.get("/metrics").text.splitlines()
    ok = [x for x in lines if x.startswith('tessera_http_responses_total{route="/v1/chat/'
                                            'completions",status="200"}')]
    assert ok and float(ok[0].split()[-1]) > 0
    assert any('status="429"' in x for x in lines) and any('status="400"' in x for x in lines)
    assert json.loads(http.get("/health").text) == {"status": "ok"}
