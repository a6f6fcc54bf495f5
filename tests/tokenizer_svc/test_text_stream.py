"""Streamed text with stop strings: what goes out equals the full decode cut at the first
stop string (plain ``str.find`` on ``decode`` is the reference), and nothing of a stop
string that spans tokens ever leaks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.common.registry import resolve_model
from tessera.tokenizer_svc.text_stream import TextStream
from tessera.tokenizer_svc.tokenizer import Tokenizer

CORPUS = [
    "Hello world\n\nBye now. Ça va? 日本語のテキスト 🙂 and more text.",
    "def f(x):\n    return x * 2\n\nprint(f(3))  # 6",
    "Once upon a time, there was a robot. The robot said: STOP! Then it stopped.",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer.load(resolve_model("smollm2-135m-instruct"))
    assert tok is not None
    return tok


def stream_all(tok: Tokenizer, ids: list[int], stop: list[str]) -> tuple[str, TextStream]:
    s = TextStream(tok, [1], stop=stop)
    out = []
    for t in ids:
        s.push([t])
        out.append(s.take())
        if s.matched_stop is not None:
            break
    else:
        s.finish()
    out.append(s.take(final=True))
    return "".join(out), s


def test_stop_string_spanning_tokens_never_leaks(tokenizer):
    ids = tokenizer.encode(CORPUS[0], add_special_tokens=False)
    seen = []
    s = TextStream(tokenizer, [1], stop=["\n\n"])
    for t in ids:
        s.push([t])
        seen.append(s.take())
        assert "\n" not in "".join(seen)  # "\n" could start the stop: it is held back
        if s.matched_stop:
            break
    assert "".join(seen) + s.take(final=True) == "Hello world"
    assert s.matched_stop == "\n\n"


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_streamed_text_equals_decode_cut_at_first_stop(tokenizer, data):
    text = data.draw(st.sampled_from(CORPUS))
    ids = tokenizer.encode(text, add_special_tokens=False)
    full = tokenizer.decode(ids)
    start = data.draw(st.integers(0, len(full) - 1))
    length = data.draw(st.integers(1, 6))
    stops = [full[start : start + length]]
    if data.draw(st.booleans()):
        stops.append("never appears in the corpus")
    streamed, s = stream_all(tokenizer, ids, stops)
    cut = min(i for i in (full.find(x) for x in stops) if i != -1)
    assert streamed == full[:cut]
    assert s.matched_stop is not None and full.startswith(s.matched_stop, cut)


def test_without_stop_strings_everything_goes_out(tokenizer):
    for text in CORPUS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        streamed, s = stream_all(tokenizer, ids, [])
        assert streamed == tokenizer.decode(ids)
        assert s.matched_stop is None
