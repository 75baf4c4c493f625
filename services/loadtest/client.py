"""One streamed request against an OpenAI-compatible endpoint, timed chunk by chunk."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

SERVER_PHASES = ("queue_ms", "prefill_ms", "transfer_ms", "first_decode_ms", "router_ms", "ttft_ms")


def phase_header(phase: str) -> str:
    """'first_decode_ms' -> 'x-pdmesh-first-decode-ms' (the router's response headers)."""
    return "x-pdmesh-" + phase.replace("_", "-")


@dataclass(frozen=True)
class Target:
    url: str  # http://host:port (no /v1)
    model: str
    endpoint: str = "completions"  # completions | chat
    api_key: str | None = None
    pdmesh: bool = False  # the server is pdmesh: ask for token ids and read the TTFT breakdown
    ignore_eos: bool = True
    temperature: float = 0.0
    timeout_s: float = 600.0

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"


@dataclass
class RequestRecord:
    index: int
    conversation: int
    turn: int
    warmup: bool = False
    start: float = 0.0  # seconds since the run started
    ttft: float | None = None  # seconds to the first chunk carrying a token
    e2e: float | None = None
    chunk_times: list[float] = field(
        default_factory=list
    )  # arrival of each token-carrying chunk, since start
    chunk_tokens: list[int] = field(
        default_factory=list
    )  # tokens in each chunk (1 each unless the server says)
    tokens_exact: bool = False  # chunk_tokens come from the server's token ids
    prompt_tokens: int = 0  # from the server's usage
    output_tokens: int = 0  # from the server's usage (else the streamed count)
    expected_prompt_tokens: int = 0  # from the workload (content only; chat templates add more)
    expected_output_tokens: int = 0
    streamed_tokens: int = 0  # counted from the stream itself
    server: dict[str, float] = field(default_factory=dict)  # pdmesh TTFT breakdown, milliseconds
    ok: bool = False
    error_kind: str = ""
    error: str = ""
    text: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("text")
        return d


def _body(
    target: Target, content: str | list[int], messages: list[dict[str, str]] | None, max_tokens: int
) -> dict:
    body: dict[str, Any] = {
        "model": target.model,
        "max_tokens": max_tokens,
        "temperature": target.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.endpoint == "chat":
        body["messages"] = messages
    else:
        body["prompt"] = content
    if target.ignore_eos:
        body["ignore_eos"] = True
    if target.pdmesh:
        body["return_token_ids"] = True
    return body


def _error_message(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return raw[:200].decode(errors="replace")


async def send(
    client: httpx.AsyncClient,
    target: Target,
    record: RequestRecord,
    content: str | list[int],
    messages: list[dict[str, str]] | None,
    max_tokens: int,
    run_start: float,
) -> RequestRecord:
    """Send one request and fill in its record; never raises for a failed request (errors are recorded)."""
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    sent = time.monotonic()
    record.start = sent - run_start
    text: list[str] = []
    try:
        async with client.stream(
            "POST",
            target.url + target.path,
            json=_body(target, content, messages, max_tokens),
            headers=headers,
            timeout=target.timeout_s,
        ) as r:
            if r.status_code != 200:
                record.error_kind = f"http_{r.status_code}"
                record.error = _error_message(await r.aread())
                return record
            record.server = {
                k: float(r.headers[phase_header(k)]) for k in SERVER_PHASES if phase_header(k) in r.headers
            }
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.monotonic()
                event = json.loads(line[6:])
                if "error" in event:
                    record.error_kind, record.error = (
                        "stream_error",
                        str(event["error"].get("message", event)),
                    )
                    return record
                if event.get("usage"):
                    record.prompt_tokens = event["usage"].get("prompt_tokens", 0)
                    record.output_tokens = event["usage"].get("completion_tokens", 0)
                    for k, v in (event.get("timings") or {}).items():
                        record.server.setdefault(k, float(v))
                for choice in event.get("choices") or []:
                    piece = (
                        choice.get("text")
                        if target.endpoint != "chat"
                        else (choice.get("delta") or {}).get("content")
                    )
                    ids = choice.get("token_ids")
                    if not piece and not ids:
                        continue
                    text.append(piece or "")
                    n = len(ids) if ids is not None else 1
                    record.tokens_exact = ids is not None
                    if record.ttft is None:
                        record.ttft = now - sent
                    record.chunk_times.append(now - run_start)
                    record.chunk_tokens.append(n)
                    record.streamed_tokens += n
        # as vllm bench serve: the request ends with its last token-carrying chunk (not the usage event or [DONE])
        record.e2e = (
            (record.chunk_times[-1] + run_start - sent) if record.chunk_times else time.monotonic() - sent
        )
        record.text = "".join(text)
        record.output_tokens = record.output_tokens or record.streamed_tokens
        record.ok = record.ttft is not None
        if not record.ok:
            record.error_kind, record.error = "empty", "the stream carried no tokens"
    except httpx.TimeoutException as e:
        record.error_kind, record.error = "timeout", str(e) or type(e).__name__
    except httpx.ConnectError as e:
        record.error_kind, record.error = "connect", str(e)
    except (httpx.RemoteProtocolError, httpx.ReadError) as e:
        record.error_kind, record.error = "disconnected", str(e) or type(e).__name__
    except json.JSONDecodeError as e:
        record.error_kind, record.error = "bad_event", str(e)
    return record
