"""Incremental detokenization and stop-string detection for one request.

Decoding token by token is wrong for byte-level and sentencepiece vocabularies (a character can span tokens; a
leading space depends on the previous token), and decoding everything each step is quadratic. The `tokenizers`
library's DecodeStream does it right in one native call per token; it is primed with the prompt's last tokens so
the first output token gets its leading space right. Tokens it holds back (an incomplete character) are decoded as
they are at the end (`flush`).
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from services.common.tokenizer import Tokenizer

PROMPT_CONTEXT_TOKENS = 5


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
        self.max_stop = max((len(s) for s in stop), default=0)
        self.stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        for token in prompt_ids[-PROMPT_CONTEXT_TOKENS:]:
            self.stream.step(tokenizer.raw, token)
        self.held: list[int] = []  # output tokens the stream has not turned into text yet
        self.text = ""
        self.emitted = 0  # characters of `text` already handed out as deltas
        self.stopped_by: str | None = None

    def add(self, token_id: int) -> None:
        piece = self.stream.step(self.tokenizer.raw, token_id)
        if piece is None:
            self.held.append(token_id)
        else:
            self.text += self.tokenizer.clean(piece)
            self.held.clear()

    def flush(self) -> None:
        """At the end: take in text still held back as an incomplete character (decoded as U+FFFD)."""
        if self.stopped_by is None and self.held:
            self.text += self.tokenizer.decode(self.held, skip_special_tokens=self.skip_special_tokens)
            self.held.clear()

    def check_stop(self, new_chars: int, include_stop: bool) -> bool:
        """Look for a stop string in the tail that the last token could have completed; truncate the text."""
        if not self.stop:
            return False
        start = max(0, len(self.text) - new_chars - self.max_stop + 1)
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
            end = max(self.emitted, end - (self.max_stop - 1))
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
