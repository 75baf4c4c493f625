"""Incremental detokenization and stop-string detection for one request.

Decoding token by token is wrong for byte-level and sentencepiece vocabularies (a character can span tokens; a
leading space depends on the previous token), and decoding everything each step is quadratic. We decode a short
window: the text of tokens [prefix, read) is known; the text of [prefix, end) minus it is the new text, held back
while it ends in an incomplete character.
"""

from __future__ import annotations

from services.engine.tokenizer import Tokenizer

PROMPT_CONTEXT_TOKENS = (
    5  # prompt tokens decoded along so the first output token gets its leading space right
)


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        skip_special_tokens: bool = True,
        stop: tuple[str, ...] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.ids = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix = 0
        self.read = len(self.ids)
        self.text = ""
        self.emitted = 0  # characters of `text` already handed out as deltas
        self.stopped_by: str | None = None

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)
        known = self._decode(self.ids[self.prefix : self.read])
        full = self._decode(self.ids[self.prefix :])
        if len(full) > len(known) and not full.endswith("\ufffd"):
            self.text += full[len(known) :]
            self.prefix, self.read = self.read, len(self.ids)

    def flush(self) -> None:
        """At the end: take in text still held back as an incomplete character (decoded as U+FFFD)."""
        if self.stopped_by is None and self.read < len(self.ids):
            known = self._decode(self.ids[self.prefix : self.read])
            self.text += self._decode(self.ids[self.prefix :])[len(known) :]
            self.prefix = self.read = len(self.ids)

    def check_stop(self, new_chars: int, include_stop: bool) -> bool:
        """Look for a stop string in the tail that the last token could have completed; truncate the text."""
        if not self.stop:
            return False
        longest = max(len(s) for s in self.stop)
        start = max(0, len(self.text) - new_chars - longest + 1)
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        self.stopped_by = stop
        self.text = self.text[: index + len(stop) if include_stop else index]
        return True

    def delta(self, final: bool = False) -> str:
        """Text not yet handed out. Unless final, the last (longest stop string - 1) characters are held back, so
        text that a later token turns into a stop string is never streamed."""
        end = len(self.text)
        if not final and self.stop:
            end = max(self.emitted, end - (max(len(s) for s in self.stop) - 1))
        out = self.text[self.emitted : end]
        self.emitted = end
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
