"""Rebuilding a Hugging Face `tokenizers.Tokenizer` from a GGUF file's tokenizer metadata.

A GGUF carries no tokenizer.json, only llama.cpp's description of one: tokens, merges
(or SentencePiece scores), token types, and the name of the pre-tokenizer. This module
owns turning that description back into a tokenizer:

- `tokenizer.ggml.model == "gpt2"`: byte-level BPE; the split regex follows
  `tokenizer.ggml.pre` (see PRE_TOKENIZERS).
- `tokenizer.ggml.model == "llama"`: SentencePiece BPE with byte fallback; merges are
  recovered from the token scores, and "▁" marks spaces (prefixed to the first piece
  of the text only, as transformers does).

Control (type 3) and unknown (type 2) tokens become special added tokens, user-defined
(type 4) ones plain added tokens, so both are matched whole in the text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
from tokenizers import pre_tokenizers as pre

from tessera.common.gguf_metadata import read_gguf_metadata

TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 2, 3, 4  # llama.cpp's llama_token_type

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(slots=True, frozen=True)
class _ByteLevelStyle:
    """How one `tokenizer.ggml.pre` family splits text before byte-level BPE."""

    pre_tokenizer: Callable[[], pre.PreTokenizer]
    normalizer: Callable[[], normalizers.Normalizer] | None = None
    ignore_merges: bool = False  # look whole words up in the vocab before merging (Llama 3)


def _gpt2_split() -> pre.PreTokenizer:
    return pre.ByteLevel(add_prefix_space=False, use_regex=True)


def _smollm_split() -> pre.PreTokenizer:
    # SmolLM's tokenizer.json: every digit on its own, then GPT-2's regex.
    return pre.Sequence([pre.Digits(individual_digits=True), _gpt2_split()])


def _regex_split(regex: str) -> Callable[[], pre.PreTokenizer]:
    def build() -> pre.PreTokenizer:
        return pre.Sequence(
            [
                pre.Split(Regex(regex), behavior="isolated"),
                pre.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    return build


_LLAMA3_STYLE = _ByteLevelStyle(_regex_split(_LLAMA3_SPLIT), ignore_merges=True)
_QWEN2_STYLE = _ByteLevelStyle(_regex_split(_QWEN2_SPLIT), normalizer=normalizers.NFC)
PRE_TOKENIZERS: dict[str, _ByteLevelStyle] = {
    "gpt2": _ByteLevelStyle(_gpt2_split),
    "smollm": _ByteLevelStyle(_smollm_split),
    "llama-bpe": _LLAMA3_STYLE,
    "llama3": _LLAMA3_STYLE,
    "llama-v3": _LLAMA3_STYLE,
    "smaug-bpe": _LLAMA3_STYLE,
    "qwen2": _QWEN2_STYLE,
    "deepseek-r1-qwen": _QWEN2_STYLE,
}


def read_tokenizer_metadata(path: str) -> dict[str, Any]:
    """Every `tokenizer.*` metadata value of the GGUF at `path`, plus general.architecture
    (common.gguf_metadata: a fraction of a second where gguf.GGUFReader takes seconds)."""
    return read_gguf_metadata(
        path, lambda key: key.startswith("tokenizer.") or key == "general.architecture"
    )


def build_tokenizer(meta: dict[str, Any], add_bos: bool, add_eos: bool) -> Tokenizer:
    """The tokenizer that GGUF metadata `meta` describes (see read_tokenizer_metadata)."""
    model = meta.get("tokenizer.ggml.model")
    if model == "gpt2":
        tokenizer = _byte_level_bpe(meta)
    elif model == "llama":
        tokenizer = _sentencepiece_bpe(meta)
    else:
        raise ValueError(
            f"GGUF tokenizer model {model!r} is not supported; Tessera builds 'gpt2' "
            "(byte-level BPE) and 'llama' (SentencePiece BPE) tokenizers"
        )
    _add_special_tokens(tokenizer, meta)
    post = _post_processor(meta, add_bos, add_eos)
    if post is not None:
        tokenizer.post_processor = post
    return tokenizer


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)  # the first of duplicate spellings wins
    return vocab


def _byte_level_bpe(meta: dict[str, Any]) -> Tokenizer:
    pre_name = meta.get("tokenizer.ggml.pre", "gpt2")
    style = PRE_TOKENIZERS.get(pre_name)
    if style is None:
        raise ValueError(
            f"GGUF pre-tokenizer {pre_name!r} is not supported; Tessera knows "
            f"{', '.join(PRE_TOKENIZERS)}"
        )
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(
        models.BPE(
            vocab=_vocab(meta["tokenizer.ggml.tokens"]),
            merges=merges,
            ignore_merges=style.ignore_merges,
        )
    )
    if style.normalizer is not None:
        tokenizer.normalizer = style.normalizer()
    tokenizer.pre_tokenizer = style.pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(meta: dict[str, Any]) -> Tokenizer:
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = _vocab(tokens)
    merges = _merges_from_scores(vocab, tokens, meta["tokenizer.ggml.scores"])
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=tokens[unk_id] if unk_id is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    add_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    tokenizer.pre_tokenizer = pre.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _merges_from_scores(
    vocab: dict[str, int], tokens: list[str], scores: list[float]
) -> list[tuple[str, str]]:
    """SentencePiece stores no merges: every split of a token into two vocabulary pieces is
    a merge, ranked by the score of the merged token (best first)."""
    ranked: list[tuple[float, int, int, str, str]] = []
    for token, score in zip(tokens, scores, strict=True):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, -len(left), -len(right), left, right))
    ranked.sort(key=lambda merge: merge[:3])
    return [(left, right) for *_, left, right in ranked]


def _add_special_tokens(tokenizer: Tokenizer, meta: dict[str, Any]) -> None:
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    special = [
        AddedToken(token, special=True, normalized=False)
        for token, kind in zip(tokens, types, strict=True)
        if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN)
    ]
    user = [
        AddedToken(token, special=False, normalized=False)
        for token, kind in zip(tokens, types, strict=True)
        if kind == TOKEN_USER_DEFINED
    ]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user)


def _post_processor(
    meta: dict[str, Any], add_bos: bool, add_eos: bool
) -> processors.PostProcessor | None:
    bos = _special_token(meta, "bos_token_id") if add_bos else []
    eos = _special_token(meta, "eos_token_id") if add_eos else []
    if not bos and not eos:
        return None
    bos_text, eos_text = [text for text, _ in bos], [text for text, _ in eos]
    return processors.TemplateProcessing(
        single=[*bos_text, "$A", *eos_text],
        pair=[*bos_text, "$A", *eos_text, *bos_text, "$B:1", *eos_text],
        special_tokens=bos + eos,
    )


def _special_token(meta: dict[str, Any], key: str) -> list[tuple[str, int]]:
    token_id = meta.get(f"tokenizer.ggml.{key}")
    if token_id is None:
        return []
    return [(meta["tokenizer.ggml.tokens"][token_id], token_id)]
