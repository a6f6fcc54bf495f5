"""``POST /v1/embeddings`` and the gRPC ``Embed`` on a real served stack (`tessera serve`,
every process real), through the official openai client and raw httpx.

The outside reference is Hugging Face transformers on the same GGUF weights: its last
hidden state (after the final norm) averaged over the prompt's positions, tokenized by
its own tokenizer. The server's token budget is small, so the long input's prefill is
chunked over several steps; a greedy generation streamed while embeddings run stays
token-exact.
"""

from __future__ import annotations

import base64
import struct
import threading

import grpc
import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tessera.proto.tessera.v1 import generate_pb2 as pb
from tests.services.launch import Server

pytestmark = pytest.mark.slow  # real processes and a whole model

MODEL = "smollm2-135m-instruct"
BUDGET = 32  # max_num_batched_tokens: the long input below takes several steps
REL_TOLERANCE = 1e-4
_LONG = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based ink and a wooden screw press. "
)
TEXTS = ["Hello, my name is", "def fibonacci(n):\n    ", _LONG * 3 + "Summary:"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("embeddings"), max_num_batched_tokens=BUDGET)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server):
    return server.stub()


@pytest.fixture(scope="module")
def token_ids(hf_tokenizer) -> list[list[int]]:
    ids = [hf_tokenizer(t).input_ids for t in TEXTS]
    assert len(ids[-1]) > 2 * BUDGET
    return ids


@pytest.fixture(scope="module")
def reference(hf_model, token_ids) -> list[torch.Tensor]:
    """transformers' mean final-norm hidden state per input (raw, not normalised)."""
    with torch.inference_mode():
        return [
            hf_model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            .hidden_states[-1][0].mean(dim=0)
            for ids in token_ids
        ]  # fmt: skip


def assert_close(vectors, reference, normalised: bool, label: str) -> None:
    assert len(vectors) == len(reference), label
    for i, (vector, ref) in enumerate(zip(vectors, reference, strict=True)):
        got = torch.tensor(vector, dtype=torch.float32)
        want = ref / ref.norm() if normalised else ref
        error = float((got - want).norm() / want.norm())
        assert error < REL_TOLERANCE, f"{label} input {i}: relative error {error:.2e}"


def test_openai_client_matches_transformers(client, reference, token_ids):
    # The client asks for base64 unless told otherwise, and decodes it itself.
    result = client.embeddings.create(model=MODEL, input=TEXTS)
    assert [d.index for d in result.data] == [0, 1, 2] and result.model == MODEL
    assert_close([d.embedding for d in result.data], reference, True, "base64, normalised")
    assert result.usage.prompt_tokens == sum(len(ids) for ids in token_ids)
    assert result.usage.total_tokens == result.usage.prompt_tokens
    floats = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert [d.embedding for d in floats.data] == [d.embedding for d in result.data]
    raw = client.embeddings.create(model=MODEL, input=TEXTS[1], extra_body={"normalize": False})
    assert_close([raw.data[0].embedding], reference[1:2], False, "raw mean")
    # token ids: one list, and a list of lists, give what the text gave
    one = client.embeddings.create(model=MODEL, input=token_ids[0], encoding_format="float")
    assert_close([one.data[0].embedding], reference[:1], True, "one list of token ids")
    many = client.embeddings.create(model=MODEL, input=token_ids, encoding_format="float")
    assert_close([d.embedding for d in many.data], reference, True, "lists of token ids")
    hidden = len(floats.data[0].embedding)
    same = client.embeddings.create(model=MODEL, input="x", dimensions=hidden)
    assert len(same.data[0].embedding) == hidden


def test_base64_is_little_endian_float32_of_the_float_answer(http):
    body = {"model": MODEL, "input": TEXTS[:2]}
    floats = http.post("/v1/embeddings", json={**body, "encoding_format": "float"}).json()
    packed = http.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    assert packed["object"] == "list" and packed["data"][0]["object"] == "embedding"
    for f, b in zip(floats["data"], packed["data"], strict=True):
        raw = base64.b64decode(b["embedding"])
        assert len(raw) == 4 * len(f["embedding"])
        assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == f["embedding"]


def counters(http: httpx.Client) -> dict[str, float]:
    """The ``tessera:`` prompt-token and per-reason success counters, by sample name."""
    found = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "tessera:prompt_tokens_total":
                found["prompt"] = sample.value
            elif sample.name == "tessera:request_success_total":
                found[sample.labels["finished_reason"]] = sample.value
    return found


def test_embeddings_count_in_the_metrics(http):
    before = counters(http)
    r = http.post("/v1/embeddings", json={"model": MODEL, "input": TEXTS}).json()
    after = counters(http)
    assert after["prompt"] - before["prompt"] == r["usage"]["prompt_tokens"]
    assert after["stop"] - before["stop"] == len(TEXTS)  # one finished sequence per input


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    error = r.json()["error"]
    assert error["message"] and error["type"], error
    return error


def test_bad_requests_are_400_and_an_unknown_model_404(http):
    max_model_len = http.get("/v1/models").json()["data"][0]["max_model_len"]
    cases = [
        ({"input": ""}, "empty"),
        ({"input": []}, "empty"),
        ({"input": ["ok", ""]}, "input 1"),
        ({"input": [[]]}, "input 0"),
        ({"input": [7] * max_model_len}, f"at most {max_model_len - 1}"),
        ({"input": [[5], [10**9]]}, "vocabulary"),
        ({"input": "x", "dimensions": 3}, "dimensions"),
        ({"input": 5}, "input"),
        ({"input": [1.5]}, "input"),
        ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"input": "x", "truncate": True}, "truncate"),
        ({"input": "x", "normalize": "maybe"}, "normalize"),
    ]
    for body, needle in cases:
        error = error_of(http.post("/v1/embeddings", json={"model": MODEL, **body}), 400)
        assert error["type"] == "invalid_request_error", (body, error)
        assert needle in error["message"] or needle == error.get("param"), (body, error)
    error_of(http.post("/v1/embeddings", json={"input": "x"}), 400)  # no model
    error = error_of(http.post("/v1/embeddings", json={"model": "nope", "input": "x"}), 404)
    assert "nope" in error["message"]


def test_grpc_embed_matches_http_and_validates(stub, http, token_ids):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    floats = http.post("/v1/embeddings", json={"model": MODEL, "input": TEXTS[:2],
                                               "encoding_format": "float"}).json()  # fmt: skip
    assert info.hidden_size == len(floats["data"][0]["embedding"]) > 0
    reply = stub.Embed(pb.EmbedRequest(inputs=[
        pb.EmbedInput(text=TEXTS[0]),
        pb.EmbedInput(token_ids=pb.TokenIds(ids=token_ids[1])),
    ]), timeout=120)  # fmt: skip
    assert [list(e.values) for e in reply.embeddings] == [d["embedding"] for d in floats["data"]]
    assert reply.usage.prompt_tokens == floats["usage"]["prompt_tokens"]
    assert reply.model == MODEL
    raw = stub.Embed(pb.EmbedRequest(inputs=[pb.EmbedInput(text=TEXTS[0])], normalize=False,
                                     dimensions=info.hidden_size), timeout=120)  # fmt: skip
    norm = sum(x * x for x in raw.embeddings[0].values) ** 0.5
    assert abs(norm - 1.0) > 1e-3  # the raw mean, not a unit vector
    bad = [
        (pb.EmbedRequest(), "input is empty"),
        (pb.EmbedRequest(inputs=[pb.EmbedInput(text="")]), "empty string"),
        (pb.EmbedRequest(inputs=[pb.EmbedInput()]), "neither text nor token_ids"),
        (pb.EmbedRequest(inputs=[pb.EmbedInput(text="x")], dimensions=3), "dimensions"),
        (pb.EmbedRequest(inputs=[pb.EmbedInput(token_ids=pb.TokenIds(
            ids=[7] * info.max_model_len))]), "tokens"),
        (pb.EmbedRequest(model="nope", inputs=[pb.EmbedInput(text="x")]), "nope"),
    ]  # fmt: skip
    for request, needle in bad:
        with pytest.raises(grpc.RpcError) as err:
            stub.Embed(request, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, err.value)
        assert needle in err.value.details(), err.value.details()


def test_embeddings_beside_a_streaming_generation(stub, client, reference):
    """Embeddings while a greedy generation streams: the generation's tokens are those of
    a run alone, the vectors still match, and the KV pool is whole afterwards."""
    sampling = pb.SamplingParameters(temperature=0.0, max_tokens=48, ignore_eos=True)
    request = pb.GenerateRequest(text=TEXTS[2], sampling=sampling)

    def generate() -> list[int]:
        return [t for m in stub.Generate(request, timeout=300) for t in m.token_ids]

    alone = generate()
    found: dict[str, list[int]] = {}
    thread = threading.Thread(target=lambda: found.setdefault("tokens", generate()))
    thread.start()
    vectors = []
    while thread.is_alive() or not vectors:
        result = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
        vectors.append([d.embedding for d in result.data])
    thread.join()
    assert found["tokens"] == alone
    for batch in vectors:
        assert_close(batch, reference, True, "beside a generation")
    load = stub.GetLoad(pb.GetLoadRequest(), timeout=30)
    assert load.num_kv_blocks_used == 0 and load.num_running == 0


def test_a_client_that_leaves_aborts_its_embeddings(server, stub, http):
    """A call of 200 long inputs (hundreds of 32-token steps) whose client gives up after
    half a second: its sequences are aborted when the connection closes, so the engine is
    idle again long before the work would have ended, and the server answers after."""
    import time

    body = {"model": MODEL, "input": [_LONG * 3 + f"Part {i}." for i in range(200)]}
    with httpx.Client(base_url=server.http_url, timeout=0.5) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/embeddings", json=body)
    left = time.monotonic()
    busy = stub.GetLoad(pb.GetLoadRequest(), timeout=30)
    while (busy.num_running or busy.num_waiting or busy.num_kv_blocks_used) and (
        time.monotonic() - left < 30
    ):
        time.sleep(0.05)
        busy = stub.GetLoad(pb.GetLoadRequest(), timeout=30)
    idle_after = time.monotonic() - left
    assert busy.num_running == busy.num_waiting == busy.num_kv_blocks_used == 0
    # all 200 inputs take far longer than this: the idle engine means they were aborted
    started = time.monotonic()
    assert http.post("/v1/embeddings", json=body).status_code == 200
    whole_call = time.monotonic() - started
    assert idle_after < whole_call / 4, (idle_after, whole_call)
