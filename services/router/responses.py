"""OpenAI response bodies and stream chunks for completions and chat completions."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from services.common.logprob import TokenLogprob
from services.common.tokenizer import Tokenizer
from services.router.pipeline import Timings


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def timings_body(t: Timings) -> dict[str, float]:
    return {k: round(v, 3) for k, v in t.__dict__.items()}


@dataclass
class LogprobFormatter:
    """Turns token logprobs into the completions (`text_offset`...) or chat (`content`) format."""

    tokenizer: Tokenizer
    chat: bool
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top: list[dict[str, float]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    content: list[dict[str, Any]] = field(default_factory=list)
    _offset: int = 0

    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def add(self, lps: list[TokenLogprob]) -> dict[str, Any] | None:
        """Record; returns this delta's logprobs object (for stream chunks)."""
        if not lps:
            return None
        delta = LogprobFormatter(self.tokenizer, self.chat, _offset=self._offset)
        for lp in lps:
            for f in (self, delta):
                f._add_one(lp)
        return delta.body()

    def _add_one(self, lp: TokenLogprob) -> None:
        token = self.text(lp.token_id)
        if self.chat:
            self.content.append(
                {
                    "token": token,
                    "logprob": lp.logprob,
                    "bytes": list(token.encode()),
                    "top_logprobs": [
                        {"token": (t := self.text(i)), "logprob": v, "bytes": list(t.encode())}
                        for i, v in lp.top
                    ],
                }
            )
        else:
            self.tokens.append(token)
            self.token_logprobs.append(lp.logprob)
            self.top.append({self.text(i): v for i, v in lp.top})
            self.offsets.append(self._offset)
        self._offset += len(token)

    def body(self) -> dict[str, Any]:
        if self.chat:
            return {"content": self.content}
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top,
            "text_offset": self.offsets,
        }


def completion_body(
    rid: str, model: str, choices: list[dict[str, Any]], usage_body: dict[str, Any], timings: Timings
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_body,
        "timings": timings_body(timings),
    }


def chat_body(
    rid: str, model: str, choices: list[dict[str, Any]], usage_body: dict[str, Any], timings: Timings
) -> dict[str, Any]:
    """choices: as the completions body's ({index, text, logprobs, finish_reason[, token_ids][, tool_calls]})."""
    out = []
    for c in choices:
        message: dict[str, Any] = {"role": "assistant", "content": c["text"]}
        if c.get("tool_calls"):
            message["tool_calls"] = c["tool_calls"]
        choice = {
            "index": c["index"],
            "message": message,
            "logprobs": c["logprobs"],
            "finish_reason": c["finish_reason"],
        }
        if "token_ids" in c:
            choice["token_ids"] = c["token_ids"]
        out.append(choice)
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": out,
        "usage": usage_body,
        "timings": timings_body(timings),
    }


def chat_chunk(
    rid: str,
    model: str,
    created: int,
    delta: dict[str, Any],
    index: int = 0,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def completion_chunk(
    rid: str,
    model: str,
    created: int,
    index: int,
    text: str,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
    }
