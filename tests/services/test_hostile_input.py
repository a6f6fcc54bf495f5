"""Whatever a client sends, `tessera serve` answers a result or a client error (issue 5).

One launcher serves the module. Hypothesis fuzzes the public gRPC request messages
(strategies built here from the message descriptors: every field of the right type, with
extreme ints, NaN and infinite floats, huge strings, token ids outside the vocabulary or
that decode to broken UTF-8) and the OpenAI HTTP bodies (random JSON, and valid bodies
with fields replaced, dropped or added). Every answer must be a result or a client error,
never INTERNAL / UNKNOWN / 500, and the server must serve a normal request afterwards,
with its KV pool whole. Then each limit, exceeded, gets its own client error; a
connection that opens too many streams is refused with a retry hint; and pickles sent to
the public and the tokenizer services are refused (and logged).
"""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera.proto.guard import DecodeGuard
from tessera.proto.tessera.v1 import generate_pb2 as pb
from tessera.proto.tessera.v1 import generate_pb2_grpc as pb_grpc
from tessera.proto.tessera.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from tessera.services.core import MAX_LOGIT_BIAS_TOKENS, MAX_N, MAX_STOP_LENGTH, MAX_STOP_STRINGS
from tessera.tokenizer_svc.server import TokenizerServicer, load_tokenizer
from tests.services.grpc_methods import GARBAGE, send_raw, served_methods
from tests.services.launch import Server

# Real processes or whole-model runs: make test-fast leaves these to make test.
pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
VOCAB = 49152
STREAMS_PER_CONNECTION = 4
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.FAILED_PRECONDITION,
}
def fuzz(max_examples: int) -> settings:
    """The CI profile's derandomized draws, a bounded number of them."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    # A short context bounds every request a fuzzed body can start (no max_tokens, or an
    # absurd one, runs to max_model_len): on a slow machine an 8k-token run outlived the
    # pool-whole check and failed the tests after it.
    s = Server(tmp_path_factory.mktemp("hostile"), max_model_len=256,
               max_streams_per_connection=STREAMS_PER_CONNECTION)  # fmt: skip
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stub(server) -> Iterator[pb_grpc.TesseraStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.TesseraStub(channel)


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http_url, timeout=60) as client:
        yield client


def assert_still_serving(stub: pb_grpc.TesseraStub) -> None:
    sampling = pb.SamplingParameters(temperature=0.0, max_tokens=3, ignore_eos=True)
    msgs = list(stub.Generate(pb.GenerateRequest(text="Still there?", sampling=sampling),
                              timeout=60))  # fmt: skip
    assert sum(len(m.token_ids) for m in msgs) == 3
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    deadline = time.monotonic() + 60  # generous: a loaded 2-core CI machine is slow
    while (load := stub.GetLoad(pb.GetLoadRequest())).num_kv_blocks_free != info.num_kv_blocks:
        assert time.monotonic() < deadline, f"the pool is not whole: {load}"
        time.sleep(0.1)
    assert (load.num_running, load.num_waiting) == (0, 0)


# -- strategies from descriptors -------------------------------------------------------------

_HUGE = "x" * (5 << 20)  # over the 4 MiB message limit
_texts = st.text(max_size=40) | st.sampled_from(["", "\x00", "\ud7ff\ufffd", "🎉" * 50, "a" * 5000])
_token_ids = st.integers(0, VOCAB - 1) | st.sampled_from([VOCAB, 2**31, 2**32 - 1])
_SCALARS = {
    FieldDescriptor.TYPE_STRING: _texts,
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_UINT32: st.integers(0, 40) | st.sampled_from([0, VOCAB, 2**31, 2**32 - 1]),
    FieldDescriptor.TYPE_INT32: st.integers(-3, 3) | st.sampled_from([-(2**31), 2**31 - 1]),
    FieldDescriptor.TYPE_UINT64: st.integers(0, 9) | st.sampled_from([2**63, 2**64 - 1]),
    FieldDescriptor.TYPE_FLOAT: st.floats(width=32)
    | st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0, float("nan"), float("inf"), -float("inf")]),
}
_BY_NAME = {  # fields whose values matter most, aimed at their edges
    "ids": _token_ids,
    "token_ids": _token_ids,
    "stop_token_ids": _token_ids,
    "model": st.sampled_from(["", "", MODEL, "gpt-4o", "\x00"]),
    "role": st.sampled_from(["user", "system", "assistant", "tool", "", "x" * 300]),
}


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values] + [99])
    return _BY_NAME.get(field.name, _SCALARS[field.type])


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of this type: each field set or not, to any value of its type; at most one
    field of each oneof; repeated fields short, or now and then long."""
    make = message_factory.GetMessageClass(descriptor)

    @st.composite
    def build(draw) -> Message:
        msg = make()
        if depth > 3:
            return msg
        chosen = {}  # oneof name -> the field set, drawn once per oneof
        for oneof in descriptor.oneofs:
            chosen[oneof.name] = draw(st.none() | st.sampled_from(list(oneof.fields)))
        for field in descriptor.fields:
            oneof = field.containing_oneof
            if oneof is not None and chosen[oneof.name] is not field:
                continue
            if oneof is None and not draw(st.booleans()):
                continue
            value = _value(field, depth)
            if field.is_repeated:
                size = st.integers(0, 4) | st.sampled_from([0, 100])
                for item in draw(st.lists(value, min_size=0, max_size=draw(size))):
                    if field.type == FieldDescriptor.TYPE_MESSAGE:
                        getattr(msg, field.name).add().CopyFrom(item)
                    else:
                        getattr(msg, field.name).append(item)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(msg, field.name).CopyFrom(draw(value))
            else:
                setattr(msg, field.name, draw(value))
        return msg

    return build()


def _rpc_error(call) -> grpc.StatusCode:
    """Take the first answer of a call (a stream is then cancelled); its status code."""
    try:
        result = call() if callable(call) else call
        if hasattr(result, "__next__"):
            next(result, None)
            result.cancel()
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.CANCELLED:
            return grpc.StatusCode.OK
        assert e.code() in CLIENT_ERRORS, (e.code(), e.details())
        return e.code()
    return grpc.StatusCode.OK


# -- fuzz ------------------------------------------------------------------------------------


def test_fuzzed_grpc_requests_get_a_result_or_a_client_error(stub):
    generate = messages(pb.GenerateRequest.DESCRIPTOR)
    huge = st.just(pb.GenerateRequest(text=_HUGE))

    @fuzz(150)
    @given(generate | huge)
    def generate_case(request):
        _rpc_error(stub.Generate(request, timeout=60))

    @fuzz(40)
    @given(messages(pb.TokenizeRequest.DESCRIPTOR), messages(pb.DetokenizeRequest.DESCRIPTOR),
           messages(pb.AbortRequest.DESCRIPTOR), messages(pb.EmbedRequest.DESCRIPTOR))  # fmt: skip
    def other_cases(tokenize, detokenize, abort, embed):
        _rpc_error(lambda: stub.Tokenize(tokenize, timeout=30))
        _rpc_error(lambda: stub.Detokenize(detokenize, timeout=30))
        _rpc_error(lambda: stub.Abort(abort, timeout=30))
        _rpc_error(lambda: stub.Embed(embed, timeout=60))

    generate_case()
    other_cases()
    assert_still_serving(stub)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-8, 8) | st.sampled_from([2**31, 2**64, -(2**63)])
    | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=12,
)  # fmt: skip
_VALID = {
    "/v1/completions": {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 3,
                        "temperature": 0},
    "/v1/chat/completions": {"model": MODEL, "max_tokens": 3,
                             "messages": [{"role": "user", "content": "Hi!"}]},
    "/v1/embeddings": {"model": MODEL, "input": "The capital of France is"},
}  # fmt: skip
_FIELDS = ["prompt", "messages", "n", "stop", "logprobs", "top_logprobs", "logit_bias",
           "temperature", "top_p", "top_k", "min_p", "seed", "stream", "stream_options",
           "echo", "best_of", "suffix", "presence_penalty", "frequency_penalty",
           "repetition_penalty", "min_tokens", "stop_token_ids", "priority", "user", "model",
           "ignore_eos", "add_generation_prompt", "skip_special_tokens", "max_tokens",
           "input", "encoding_format", "dimensions", "normalize"]  # fmt: skip


@st.composite
def http_bodies(draw) -> tuple[str, bytes]:
    path = draw(st.sampled_from(sorted(_VALID)))
    kind = draw(st.sampled_from(["random", "mutated", "mutated", "bytes"]))
    if kind == "random":
        return path, json.dumps(draw(_json)).encode()
    if kind == "bytes":
        return path, draw(st.binary(max_size=64) | st.just(pickle.dumps({"prompt": "hi"})))
    body = dict(_VALID[path])
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(_FIELDS))
        if name in ("max_tokens",):  # never unbounded: kept short or made absurd
            body[name] = draw(st.sampled_from([0, -1, 1, 2**31, 2**64, "3", "x", 1.5]))
        elif draw(st.integers(0, 5)) == 0 and name not in ("model",):
            body.pop(name, None)
        else:
            body[name] = draw(_json)
    if body.get("stream") is not True and path == "/v1/completions":
        body.setdefault("max_tokens", 3)
    return path, json.dumps(body, allow_nan=True).encode()


def test_fuzzed_http_bodies_get_a_result_or_a_client_error(http, stub):
    @fuzz(120)
    @given(http_bodies())
    def case(path_body):
        path, body = path_body
        headers = {"Content-Type": "application/json"}
        with http.stream("POST", path, content=body, headers=headers) as r:
            if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
                next(r.iter_lines())  # a stream has begun: that is a result
                return
            r.read()
        assert r.status_code < 500, (r.status_code, r.text, body[:300])
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    case()
    assert_still_serving(stub)


# -- limits ------------------------------------------------------------------------------------


def _sampling(**kwargs) -> pb.GenerateRequest:
    return pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(max_tokens=2, **kwargs))


# Each front's invalid cases; test_one_validation_for_both_apis sends each to the other.
GRPC_INVALID = [
    (_sampling(n=MAX_N + 1), grpc.StatusCode.INVALID_ARGUMENT, "n must be"),
    (_sampling(logprobs=21), grpc.StatusCode.INVALID_ARGUMENT, "logprobs"),
    (_sampling(stop=["a"] * (MAX_STOP_STRINGS + 1)), grpc.StatusCode.INVALID_ARGUMENT,
     "stop strings"),
    (_sampling(stop=["a" * (MAX_STOP_LENGTH + 1)]), grpc.StatusCode.INVALID_ARGUMENT,
     "stop strings"),
    (_sampling(stop_token_ids=list(range(300))), grpc.StatusCode.INVALID_ARGUMENT,
     "stop_token_ids"),
    (_sampling(seed=2**64 - 1, n=4, temperature=1.0), None, None),  # wraps, not an error
    (pb.GenerateRequest(text=_HUGE), grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    (pb.GenerateRequest(text="hi " * 20000), grpc.StatusCode.INVALID_ARGUMENT,
     "max_model_len"),
    (pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="", content="x")])),
     grpc.StatusCode.INVALID_ARGUMENT, "empty role"),
    (pb.GenerateRequest(chat=pb.ChatMessages(messages=[
        pb.ChatMessage(role="wizard", content="x")])), grpc.StatusCode.INVALID_ARGUMENT,
     "messages[0].role must be"),
    (_sampling(temperature=2.5), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (_sampling(top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (pb.GenerateRequest(text="hi", cache_salt="s" * 1000), grpc.StatusCode.INVALID_ARGUMENT,
     "cache_salt"),
]  # fmt: skip


@pytest.mark.parametrize("request_, code, needle", GRPC_INVALID)
def test_grpc_limits_exceeded_are_client_errors(stub, request_, code, needle):
    if code is None:
        assert len(list(stub.Generate(request_, timeout=60))) >= 2
        return
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request_, timeout=60))
    assert err.value.code() == code and needle in err.value.details()


HTTP_INVALID = [
    ("/v1/completions", {"prompt": "hi", "n": MAX_N + 1}, 400, "n must be"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "logprobs": True, "top_logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "stop": ["s"] * (MAX_STOP_STRINGS + 1)}, 400,
     "stop strings"),
    ("/v1/completions", {"prompt": "hi", "stop": "s" * (MAX_STOP_LENGTH + 1)}, 400,
     "stop strings"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {str(i): 1 for i in range(
        MAX_LOGIT_BIAS_TOKENS + 1)}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": ["hi"] * 65}, 400, "prompts"),
    ("/v1/completions", {"prompt": "a" * (5 << 20)}, 413, "bytes"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages[0].role must be"),
    ("/v1/completions", {"prompt": "hi", "seed": 2**64}, 400, "seed must be"),
    ("/v1/completions", {"prompt": "hi", "min_p": 1.5}, 400, "min_p"),
]  # fmt: skip


@pytest.mark.parametrize("path, body, status, needle", HTTP_INVALID)
def test_http_limits_exceeded_are_client_errors(http, path, body, status, needle):
    r = http.post(path, json={"model": MODEL, "max_tokens": 2, **body})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_http_headers_over_the_limit_are_refused(http):
    r = http.get("/v1/models", headers={"X-Padding": "a" * (32 << 10)})
    assert r.status_code == 431 and "headers" in r.json()["error"]["message"]
    r = http.get("/health", headers={"X-Padding": "a" * (200 << 10)})  # h11's own limit
    assert 400 <= r.status_code < 500
    assert http.get("/health").status_code == 200


def test_a_connection_with_too_many_streams_is_refused_with_a_retry_hint(server, stub):
    sampling = pb.SamplingParameters(temperature=0.0, max_tokens=240, ignore_eos=True)
    long = pb.GenerateRequest(text="Count:", sampling=sampling)

    async def main() -> None:
        async with grpc.aio.insecure_channel(server.target) as ch:
            crowded = pb_grpc.TesseraStub(ch)
            calls = [crowded.Generate(long) for _ in range(STREAMS_PER_CONNECTION)]
            for call in calls:
                await call.read()  # each has begun
            extra = crowded.Generate(long)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await extra.read()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_streams_per_connection" in err.value.details()
            hint = dict(err.value.trailing_metadata())["retry-after-ms"]
            assert int(hint) > 0
            # Another connection is not crowded.
            short = pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(max_tokens=1))
            assert len(list(stub.Generate(short, timeout=60))) == 1
            calls[0].cancel()
            await asyncio.sleep(0.2)
            assert len([m async for m in crowded.Generate(short)]) == 1
            for call in calls[1:]:
                call.cancel()

    asyncio.run(main())
    assert_still_serving(stub)


# -- pickles ------------------------------------------------------------------------------------


class _Exploit:
    def __reduce__(self):
        return (print, ("unpickled!",))


PICKLES = [pickle.dumps(_Exploit()), pickle.dumps({"text": "hi"}), b"\xff\xfe garbage"]


def test_pickles_are_refused_by_the_gateway_and_a_tokenizer_replica(server, stub):
    with grpc.insecure_channel(server.target) as channel:
        raw = channel.unary_stream("/tessera.v1.Tessera/Generate")
        for payload in PICKLES:
            with pytest.raises(grpc.RpcError) as err:
                list(raw(payload, timeout=10))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with grpc.insecure_channel(f"unix:{server.run_dir}/tokenizer-0.sock") as channel:
        raw = channel.unary_unary("/tessera.internal.v1.TokenizerService/Tokenize")
        for payload in PICKLES:
            with pytest.raises(grpc.RpcError) as err:
                raw(payload, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        ok = tokenizer_pb2_grpc.TokenizerServiceStub(channel).Tokenize(
            tokenizer_pb2.TokenizeBatchRequest(inputs=[tokenizer_pb2.TokenizeInput(text="hi")])
        )
        assert list(ok.outputs[0].token_ids)
    assert_still_serving(stub)


def test_the_tokenizer_service_logs_what_it_refuses(caplog):
    """The same servicer and guard as a replica, in process, to read its log."""

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            server = grpc.aio.server(interceptors=[DecodeGuard()])
            tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(
                TokenizerServicer(load_tokenizer(MODEL), pool), server
            )
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                    raw = ch.unary_unary("/tessera.internal.v1.TokenizerService/Tokenize")
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await raw(PICKLES[0])
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            finally:
                await server.stop(0)

    with caplog.at_level(logging.WARNING, logger="tessera.proto.guard"):
        asyncio.run(main())
    assert "rejected an undecodable request to /tessera.internal.v1.TokenizerService/Tokenize" in (
        caplog.text
    )


# -- one validation for both fronts (issue 19) --------------------------------------------------

_GRPC_FOR_HTTP = {200: None, 400: grpc.StatusCode.INVALID_ARGUMENT,
                  413: grpc.StatusCode.RESOURCE_EXHAUSTED}  # fmt: skip
_HTTP_FOR_GRPC = {code: status for status, code in _GRPC_FOR_HTTP.items()}


def grpc_as_http(request: pb.GenerateRequest) -> tuple[str, dict]:
    """The same request as an OpenAI body: text is a completions prompt, a chat a chat."""
    s = request.sampling
    body: dict = {f.name: list(v) if f.is_repeated else v for f, v in s.ListFields() if f.name in (
        "n", "stop", "stop_token_ids", "seed", "temperature", "top_p", "min_p", "max_tokens")}
    if request.cache_salt:
        body["cache_salt"] = request.cache_salt
    if request.WhichOneof("input") == "chat":
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        if s.HasField("logprobs"):
            body.update(logprobs=True, top_logprobs=s.logprobs)
        return "/v1/chat/completions", body
    body["prompt"] = request.text
    if s.HasField("logprobs"):
        body["logprobs"] = s.logprobs
    return "/v1/completions", body


def http_as_grpc(path: str, body: dict) -> pb.GenerateRequest | None:
    """The same request on gRPC; None where gRPC has no such field (a prompt list,
    logit_bias): those cases are the HTTP API's own."""
    body = dict(body)
    sampling = pb.SamplingParameters(max_tokens=2)
    request = pb.GenerateRequest(cache_salt=body.pop("cache_salt", ""))
    if "messages" in body:
        for m in body.pop("messages"):
            request.chat.messages.add(role=m["role"], content=m["content"])
        if body.pop("logprobs", False):
            sampling.logprobs = body.pop("top_logprobs", 0)
    else:
        prompt = body.pop("prompt")
        if not isinstance(prompt, str):
            return None
        request.text = prompt
    for name, value in body.items():
        if name not in pb.SamplingParameters.DESCRIPTOR.fields_by_name:
            return None
        field = getattr(sampling, name)
        if isinstance(value, str) and name == "stop":
            value = [value]
        if isinstance(value, list):
            field.extend(value)
        elif name == "seed" and value >= 2**64:
            return None  # a uint64 cannot carry it: refused by the wire type itself
        else:
            setattr(sampling, name, value)
    request.sampling.CopyFrom(sampling)
    return request


def test_one_validation_for_both_apis(stub, http):
    """Every invalid case of one front's table is refused by the other front too, with the
    same message (issue 19: a chat role "wizard" was taken on gRPC, refused on HTTP)."""
    for request, code, needle in GRPC_INVALID:
        path, body = grpc_as_http(request)
        r = http.post(path, json={"model": MODEL, "max_tokens": 2, **body})
        status = _HTTP_FOR_GRPC[code]
        if code is None:
            assert r.status_code == 200, r.text
            continue
        assert r.status_code == status, (needle, r.text[:300])
        if status == 400:
            assert needle in r.json()["error"]["message"], r.text
    mirrored = 0
    for path, body, status, needle in HTTP_INVALID:
        request = http_as_grpc(path, body)
        if request is None:
            continue
        mirrored += 1
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(request, timeout=60))
        assert err.value.code() == _GRPC_FOR_HTTP[status], (needle, err.value)
        if status == 400:
            assert needle in err.value.details(), err.value.details()
    assert mirrored >= len(HTTP_INVALID) - 3  # prompt lists, logit_bias, a seed over uint64


# -- invalid Unicode in every string a client sends (issue 19) ----------------------------------

_BAD = "\ud800"
_CHAT = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
_CMPL = {"model": MODEL, "max_tokens": 2, "prompt": "hi"}
# (path, body with one string made invalid, the field the 400 must name)
UNICODE_CASES = [
    ("/v1/chat/completions", {**_CHAT, "messages": [{"role": "user", "content": _BAD}]},
     "messages[0].content"),
    ("/v1/chat/completions", {**_CHAT, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a\udfffb"}]}]}, "messages[0].content[0].text"),
    ("/v1/chat/completions", {**_CHAT, "messages": [{"role": _BAD, "content": "hi"}]},
     "messages[0].role"),
    ("/v1/chat/completions", {**_CHAT, "messages": [{"role": "user", "content": "hi",
                                                     "name": _BAD}]}, "messages[0].name"),
    ("/v1/completions", {**_CMPL, "prompt": _BAD}, "prompt"),
    ("/v1/completions", {**_CMPL, "prompt": ["ok", "x\udfff"]}, "prompt[1]"),
    ("/v1/completions", {**_CMPL, "stop": [_BAD]}, "stop[0]"),
    ("/v1/completions", {**_CMPL, "stop": _BAD}, "stop"),
    ("/v1/completions", {**_CMPL, "cache_salt": _BAD}, "cache_salt"),
    ("/v1/completions", {**_CMPL, "model": _BAD}, "model"),
    ("/v1/completions", {**_CMPL, "user": _BAD}, "user"),
    ("/v1/completions", {**_CMPL, "suffix": _BAD}, "suffix"),
    ("/v1/completions", {**_CMPL, "logit_bias": {_BAD: 1}}, "logit_bias['\\ud800']"),
    ("/v1/completions", {**_CMPL, _BAD: 1}, "the key '\\ud800'"),
    ("/v1/embeddings", {"model": MODEL, "input": ["ok", _BAD]}, "input[1]"),
    ("/v1/embeddings", {"model": MODEL, "input": "x", "user": _BAD}, "user"),
]  # fmt: skip


def test_invalid_unicode_is_a_400_naming_the_field_and_the_connection_lives(http):
    def local_port(r: httpx.Response) -> int:
        return r.extensions["network_stream"].get_extra_info("client_addr")[1]

    port = local_port(http.get("/v1/models"))
    for path, body, field in UNICODE_CASES:
        # json.dumps escapes the lone surrogate as \ud800, as the client sent it
        r = http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (field, r.status_code, r.text)
        error = r.json()["error"]
        assert error["param"] == field and "not valid Unicode" in error["message"], error
        assert local_port(r) == port, "the keep-alive connection was dropped"
    # The same surrogate as raw (CESU-style) bytes, which json.loads would let through.
    raw = json.dumps({**_CMPL, "prompt": "QQ"}).encode().replace(b"QQ", b"\xed\xa0\x80")
    r = http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    # A valid surrogate pair is an astral character, not an error.
    ok = http.post("/v1/completions", content=json.dumps({**_CMPL, "prompt": "🎉 hi"}),
                   headers={"Content-Type": "application/json"})  # fmt: skip
    assert ok.status_code == 200, ok.text
    assert local_port(ok) == port


def _with_bad_utf8(request: pb.GenerateRequest) -> bytes:
    """The request's bytes with its marker string QQ made an unpaired surrogate (CESU)."""
    return request.SerializeToString().replace(b"QQ", b"\xed\xa0\x80")


def test_invalid_utf8_on_grpc_is_invalid_argument_naming_the_field(server, stub):
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi"),
                                     pb.ChatMessage(role="user", content="QQ")])  # fmt: skip
    cases = [
        (pb.GenerateRequest(text="QQ"), "text"),
        (pb.GenerateRequest(chat=chat), "chat.messages[1].content"),
        (pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(stop=["a", "QQ"])),
         "sampling.stop[1]"),
        (pb.GenerateRequest(text="hi", cache_salt="QQ"), "cache_salt"),
        (pb.GenerateRequest(text="hi", model="QQ"), "model"),
        (pb.GenerateRequest(text="hi", request_id="QQ"), "request_id"),
    ]
    with grpc.insecure_channel(server.target) as channel:
        generate = channel.unary_stream("/tessera.v1.Tessera/Generate")
        tokenize = channel.unary_unary("/tessera.v1.Tessera/Tokenize")
        for request, field in cases:
            with pytest.raises(grpc.RpcError) as err:
                list(generate(_with_bad_utf8(request), timeout=30))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"{field} is not valid UTF-8" in err.value.details(), err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            tokenize(_with_bad_utf8(pb.TokenizeRequest(chat=chat)), timeout=30)
        assert "chat.messages[1].content is not valid UTF-8" in err.value.details()
        embed = channel.unary_unary("/tessera.v1.Tessera/Embed")
        request = pb.EmbedRequest(inputs=[pb.EmbedInput(text="ok"), pb.EmbedInput(text="QQ")])
        with pytest.raises(grpc.RpcError) as err:
            embed(_with_bad_utf8(request), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "inputs[1].text is not valid UTF-8" in err.value.details(), err.value.details()
    assert_still_serving(stub)


# -- raw garbage to every method every process serves (issue 19) --------------------------------


def test_garbage_to_every_served_method_is_invalid_argument(server, stub):
    """Methods as each server's reflection lists them: grpcio's health (Check, and Watch,
    a stream handler that is no async generator) and reflection (a request stream) too."""
    for target in (server.target, f"unix:{server.run_dir}/tokenizer-0.sock"):
        with grpc.insecure_channel(target) as channel:
            methods = served_methods(channel)
            assert any(m.path == "/grpc.health.v1.Health/Watch" for m in methods)
            assert any(m.client_streaming for m in methods)  # reflection
            for method in methods:
                for payload in GARBAGE:
                    with pytest.raises(grpc.RpcError) as err:
                        send_raw(channel, method, payload)
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.value)
    assert_still_serving(stub)
