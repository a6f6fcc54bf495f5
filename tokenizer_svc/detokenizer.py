"""Incremental detokenization: turning a stream of sampled token ids into new text.

Decoding each token alone is wrong (a space, or one UTF-8 character, may span several
tokens) and decoding the whole output every step is quadratic. This is the
prefix-offset/read-offset technique of vLLM and TGI, keeping only the window it decodes:

    window:  p p p | n n n
             ^0     ^read_offset
    p: the tokens of the last emitted text (context: a leading space, a byte sequence)
    n: tokens pushed since, whose text is not out yet

    new text = decode(window) minus decode(window[:read_offset])

Text ending in U+FFFD (an incomplete UTF-8 character) is held back until the tokens
that complete it arrive. When text goes out, the n tokens become the next p.
"""

from __future__ import annotations

from tessera.tokenizer_svc.tokenizer import Tokenizer

# Prompt tokens kept as context for the first output token, as vLLM and TGI do.
_PROMPT_CONTEXT = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Per-request detokenization state. For byte-level BPE vocabularies, the text of all
    `push` calls plus `flush` equals `tokenizer.decode(all_output_ids)`. For SentencePiece
    vocabularies it keeps the first output token's leading space, which decode of the
    output alone strips (it equals decode(prompt + output) minus decode(prompt))."""

    __slots__ = ("_tokenizer", "_skip_special_tokens", "_window", "_read_offset")

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._window = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._read_offset = len(self._window)

    def push(self, token_ids: list[int]) -> str:
        """Append sampled tokens; return the text they complete ("" while a character is
        incomplete). Never returns a partial UTF-8 character."""
        self._window.extend(token_ids)
        prefix_text, text = self._decode_window()
        if text.endswith(_REPLACEMENT) or len(text) <= len(prefix_text):
            # An incomplete character; or only skipped special tokens arrived.
            return ""
        self._advance()
        return text[len(prefix_text) :]

    def flush(self) -> str:
        """Text still held back at the end of the stream (an incomplete character decodes
        to U+FFFD, as in `decode`)."""
        prefix_text, text = self._decode_window()
        self._advance()
        return text[len(prefix_text) :]

    def _decode_window(self) -> tuple[str, str]:
        decode, skip = self._tokenizer.decode, self._skip_special_tokens
        prefix_text = decode(self._window[: self._read_offset], skip_special_tokens=skip)
        return prefix_text, decode(self._window, skip_special_tokens=skip)

    def _advance(self) -> None:
        del self._window[: self._read_offset]
        self._read_offset = len(self._window)
