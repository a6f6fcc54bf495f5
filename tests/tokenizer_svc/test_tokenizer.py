"""Tokenizer, chat templates and incremental detokenizer against transformers' tokenizers
built from the same files (the outside reference)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from tessera.common.registry import resolve_model, smollm2_gguf_path
from tessera.tokenizer_svc import ChatTemplateError, IncrementalDetokenizer, Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never download

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }',
    "3.14159 1234567890 -42 1e-9 0x1F 2024-06-01 $1,000.00",
    "   leading spaces, trailing spaces   ",
    "tabs\tand\t\tmore\ttabs",
    "line one\nline two\n\n\nline five\r\nwindows",
    "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "中文字符测试，日本語のテキスト、한국어 텍스트",
    "Café naïve résumé Ærøskøbing Ångström façade São Paulo",
    "Ελληνικά, русский текст, עברית, العربية",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|> inside text <repo_name> and <filename>",
    "it's I'm we'll they've she'd DON'T",
    "",
    " ",
    "\n",
    "a" * 300,
    "mixed: x² + y² = z², ∑∫∂ ≠ ≈ ∞, → ← ↑",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Where is the treasure?"},
    ],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3? Answer in 中文 😀"},
    ],
    [
        {"role": "system", "content": ""},
        {"role": "user", "content": "  spaces  \n\nand newlines\n"},
        {"role": "assistant", "content": "ok"},
    ],
]


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    tokenizer = Tokenizer.load(resolve_model("smollm2-135m-instruct"))
    assert tokenizer is not None
    return tokenizer


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("gguf")
    (directory / GGUF_NAME).symlink_to(smollm2_gguf_path())
    return AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def from_hf_dir(tmp_path_factory, reference) -> Tokenizer:
    directory = tmp_path_factory.mktemp("hf")
    reference.save_pretrained(directory)
    return Tokenizer.from_hf_dir(directory)


# --- encode / decode ---------------------------------------------------------------------


@pytest.mark.parametrize("text", CORPUS)
def test_encode_and_decode_match_transformers(ours: Tokenizer, reference, text: str):
    ids = ours.encode(text)
    assert ids == reference(text)["input_ids"]
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids)


def test_special_tokens_stay_whole_and_are_skipped_on_decode(ours: Tokenizer):
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == ours.token_to_id("<|im_start|>") == 1
    assert ids[-1] == ours.token_to_id("<|im_end|>") == 2
    assert ours.decode(ids) == "user\nhi"
    assert ours.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_model_facts_match_transformers(ours: Tokenizer, reference):
    assert ours.vocab_size == len(reference) == 49152
    assert ours.eos_token_ids == (reference.eos_token_id,) == (2,)
    assert ours.bos_token_id == reference.bos_token_id == 1
    ids = ours.encode("Hello wörld 😀")
    assert [ours.id_to_token(i) for i in ids] == reference.convert_ids_to_tokens(ids)
    assert ours.id_to_token(10**6) is None
    # The file says add_bos_token = false: no BOS, with or without special tokens.
    assert ours.encode("hi") == ours.encode("hi", add_special_tokens=False)
    assert ours.encode_batch(CORPUS[:3]) == [ours.encode(t) for t in CORPUS[:3]]


def test_random_weights_have_no_tokenizer():
    assert Tokenizer.load(resolve_model("random:smollm2-135m")) is None


def test_hf_directory_tokenizer_matches(from_hf_dir: Tokenizer, ours: Tokenizer):
    for text in CORPUS:
        assert from_hf_dir.encode(text) == ours.encode(text)
    assert from_hf_dir.eos_token_ids == ours.eos_token_ids
    assert from_hf_dir.bos_token_id == ours.bos_token_id
    assert from_hf_dir.chat_template == ours.chat_template
    assert from_hf_dir.apply_chat_template(CONVERSATIONS[1]) == ours.apply_chat_template(
        CONVERSATIONS[1]
    )


def _write_sentencepiece_gguf(path: Path) -> None:
    """A tiny SentencePiece vocabulary (tokenizer.ggml.model "llama") with byte fallback."""
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "!", "he", "ll", "llo", "hello"]
    pieces += ["▁hello", "▁w", "or", "▁wor", "ld", "▁world", "▁▁", "▁!"]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces)
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
    writer.add_token_scores([0.0] * 259 + [-float(rank) for rank in range(len(pieces))])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_sentencepiece_gguf_matches_transformers(tmp_path: Path):
    from transformers import AutoTokenizer

    _write_sentencepiece_gguf(tmp_path / "sp.gguf")
    ours = Tokenizer.from_gguf(tmp_path / "sp.gguf")
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file="sp.gguf")
    texts = ["hello world", "hello  world!", "Hello wörld", "<s>hello</s> world", "a\nb", ""]
    for text in texts:
        ids = ours.encode(text)
        assert ids == reference(text)["input_ids"], text
        assert ids[0] == ours.bos_token_id == 1  # SentencePiece GGUFs add BOS by default
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert ours.decode(ours.encode("Hello wörld")) == "Hello wörld"  # byte fallback


# --- chat templates ----------------------------------------------------------------------


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    ours: Tokenizer, reference, messages, add_generation_prompt: bool
):
    expected = reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.apply_chat_template(messages, add_generation_prompt) == expected


def test_chat_template_sees_special_tokens_and_kwargs(ours: Tokenizer):
    template = "{{ bos_token }}|{{ eos_token }}|{{ extra }}|{{ tools | tojson }}"
    rendered = ours.apply_chat_template(
        [], chat_template=template, extra="<&>", tools=[{"name": "f"}]
    )
    assert rendered == '<|im_start|>|<|im_end|>|<&>|[{"name": "f"}]'


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{% set ns = namespace(_private=1) %}{{ ns }}",
        "{{ raise_exception.__globals__ }}",
        "{% set x = messages.append(1) %}",
    ],
)
def test_unsafe_templates_raise_a_security_error(ours: Tokenizer, template: str):
    import jinja2

    with pytest.raises(ChatTemplateError) as error:
        ours.apply_chat_template([{"role": "user", "content": "x"}], chat_template=template)
    assert isinstance(error.value.__cause__, jinja2.exceptions.SecurityError)


def test_template_errors_are_reported(ours: Tokenizer):
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        ours.apply_chat_template([], chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ChatTemplateError, match="TemplateSyntaxError"):
        ours.apply_chat_template([], chat_template="{% for %}")
    without = dataclasses.replace(ours, chat_template=None)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        without.apply_chat_template([{"role": "user", "content": "hi"}])


# --- incremental detokenization ----------------------------------------------------------


def _stream(tokenizer: Tokenizer, prompt: list[int], output: list[int], chunks: list[int]):
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    pieces, start = [], 0
    for size in chunks:
        pieces.append(detokenizer.push(output[start : start + size]))
        start += size
    pieces.append(detokenizer.push(output[start:]))
    return pieces, detokenizer.flush()


@pytest.mark.parametrize(
    "text",
    ["😀🎉👍🏽", "家族👨‍👩‍👧‍👦 and 中文字符测试", "naïve Ærøskøbing", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫∂"],
)
def test_detokenizer_never_splits_a_character(ours: Tokenizer, text: str):
    prompt = ours.encode(ours.apply_chat_template([{"role": "user", "content": "Say it"}]))
    output = ours.encode(text)
    assert len(output) > len(text.replace(" ", "")) // 2  # multi-token characters exist
    pieces, rest = _stream(ours, prompt, output, [1] * len(output))
    assert all("\ufffd" not in piece for piece in pieces)
    assert "" in pieces  # some token ended mid-character, and its text was held back
    assert "".join(pieces) + rest == ours.decode(output) == text
    assert rest == ""


def test_detokenizer_skips_special_tokens_like_decode(ours: Tokenizer):
    output = ours.encode("Hi! 😀<|im_end|>\n<|im_start|>more")
    for skip in (True, False):
        detokenizer = IncrementalDetokenizer(ours, [], skip_special_tokens=skip)
        text = "".join(detokenizer.push([token]) for token in output) + detokenizer.flush()
        assert text == ours.decode(output, skip_special_tokens=skip)


def test_detokenizer_flush_returns_an_incomplete_tail(ours: Tokenizer):
    output = ours.encode("ok 😀")[:-1]  # the emoji's last byte is missing
    detokenizer = IncrementalDetokenizer(ours, [])
    text = "".join(detokenizer.push([token]) for token in output)
    assert text.startswith("ok") and "\ufffd" not in text
    tail = detokenizer.flush()
    assert tail.endswith("\ufffd")
    assert text + tail == ours.decode(output)


# --- properties --------------------------------------------------------------------------

PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
_BYTES_TO_VOCAB = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)


def _lossless_text(tokenizer: Tokenizer) -> st.SearchStrategy[str]:
    """Text the tokenizer can spell exactly: SmolLM2's vocabulary lacks 21 byte tokens
    (e.g. 0x04, and 0xF1, the first byte of U+40000..U+7FFFF), which BPE drops. Without
    U+FFFD, so that any U+FFFD in a decoded piece is a split character."""

    def in_vocab(char: str) -> bool:
        (spelled, _), *_ = _BYTES_TO_VOCAB.pre_tokenize_str(char)
        return all(tokenizer.token_to_id(byte) is not None for byte in spelled)

    return st.text(st.characters(exclude_characters="\ufffd").filter(in_vocab), max_size=60)


# Numeric characters outside ASCII (category No/Nl, e.g. "¼", "Ⅷ") are left out: SmolLM2's
# own tokenizer.json and llama.cpp's "smollm" pre-tokenizer split every \p{N} character
# alone, as we do, but transformers' GGUF converter does not (" ¼" -> [216, 28151] in
# the original, [3351, 137] in the converter), so it is no reference there.
_COMPARABLE_TEXT = st.text(st.characters(exclude_categories=("No", "Nl")), max_size=60)


@PROPERTY_SETTINGS
@given(text=_COMPARABLE_TEXT)
def test_encode_matches_transformers_on_any_text(ours: Tokenizer, reference, text: str):
    assert ours.encode(text) == reference(text)["input_ids"]


@PROPERTY_SETTINGS
@given(data=st.data())
def test_round_trip_where_lossless(ours: Tokenizer, data):
    text = data.draw(_lossless_text(ours), label="text")
    assert ours.decode(ours.encode(text), skip_special_tokens=False) == text


@PROPERTY_SETTINGS
@given(data=st.data())
def test_detokenizer_concatenation_equals_decode(ours: Tokenizer, data):
    prompt = ours.encode(data.draw(st.text(max_size=20), label="prompt"))
    output = ours.encode(data.draw(_lossless_text(ours), label="text"))
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=len(output)), label="chunks")
    pieces, rest = _stream(ours, prompt, output, chunks)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + rest == ours.decode(output)


@pytest.mark.slow  # the gguf package takes seconds over the default model's vocabulary
def test_the_fast_gguf_metadata_reader_matches_the_gguf_package(tmp_path):
    """common.gguf_metadata against gguf.GGUFReader (the outside reference): every key and
    value of the default model's file, and of a file the gguf package writes with every
    value type; a key the filter refuses is stepped over, not returned."""
    from tessera.common.gguf_metadata import read_gguf_metadata

    path = tmp_path / "all_types.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -5)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -3000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -7)
    writer.add_float32("t.f32", 0.5)
    writer.add_uint64("t.u64", 2**40)
    writer.add_int64("t.i64", -(2**40))
    writer.add_float64("t.f64", 0.25)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo")
    writer.add_array("t.strs", ["a", "", "ü"])
    writer.add_array("t.ints", [1, 2, 3])
    writer.add_array("t.floats", [0.5, -1.25])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    for file in (path, smollm2_gguf_path()):
        reference = {k: f.contents() for k, f in gguf.GGUFReader(str(file)).fields.items()
                     if not k.startswith("GGUF.")}
        got = read_gguf_metadata(str(file))
        assert got == reference
    assert read_gguf_metadata(str(path), lambda k: k == "t.str") == {"t.str": "héllo"}
