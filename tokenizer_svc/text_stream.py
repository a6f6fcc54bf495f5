"""Streamed text of one sequence: incremental detokenization plus exact stop strings.

Shared by the offline engine and the gateway so both stream the same text. Text that
could be the start of a stop string is held back until it is known not to be one
(at most the longest stop string minus one character), so a stop string that spans
several tokens never leaks to the client:

    stop = "\\n\\n"    tokens: "Hi" "\\n" "\\n"
    push("Hi")   -> "Hi" may go out
    push("\\n")   -> "\\n" is held (it may start the stop)
    push("\\n")   -> stop matched: text is "Hi", nothing more goes out
"""

from __future__ import annotations

from tessera.tokenizer_svc.detokenizer import IncrementalDetokenizer
from tessera.tokenizer_svc.tokenizer import Tokenizer


class TextStream:
    __slots__ = ("_detok", "_stop", "_include_stop", "_hold", "text", "_sent", "matched_stop")

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        stop: list[str] | tuple[str, ...] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens)
        self._stop = tuple(stop)
        self._include_stop = include_stop_str_in_output
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""  # all text so far, cut at a matched stop string
        self._sent = 0  # characters of text already handed out by take()
        self.matched_stop: str | None = None

    def push(self, token_ids: list[int]) -> None:
        """Add tokens; afterwards ``matched_stop`` is set if a stop string appeared."""
        if self.matched_stop is not None:
            return
        old_len = len(self.text)
        self.text += self._detok.push(token_ids)
        if self._stop:
            self._find_stop(max(0, old_len - self._hold))

    def finish(self) -> None:
        """The sequence ended: decode whatever the detokenizer still holds."""
        if self.matched_stop is None:
            old_len = len(self.text)
            self.text += self._detok.flush()
            if self._stop:
                self._find_stop(max(0, old_len - self._hold))

    def take(self, final: bool = False) -> str:
        """New text safe to stream now; with ``final`` (or after a stop), all of it."""
        end = len(self.text)
        if not final and self.matched_stop is None:
            end = max(self._sent, end - self._hold)
        out = self.text[self._sent : end]
        self._sent = end
        return out

    def _find_stop(self, start: int) -> None:
        best: tuple[int, str] | None = None
        for s in self._stop:
            i = self.text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            i, s = best
            self.text = self.text[: i + len(s)] if self._include_stop else self.text[:i]
            self.matched_stop = s
