"""Run a workload against a target with an arrival process: warm-up first, then the measured requests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import httpx
from tqdm import tqdm

from services.loadtest.arrival import Arrival
from services.loadtest.client import RequestRecord, Target, send
from services.loadtest.workloads import Conversation


@dataclass
class RunResult:
    records: list[RequestRecord]  # measured requests only
    duration: float  # first measured request sent to last one finished, seconds
    arrival: Arrival
    warmup_records: list[RequestRecord]


def _messages(conv: Conversation, content: str | list[int]) -> list[dict[str, str]]:
    system = [{"role": "system", "content": conv.system}] if conv.system else []
    return [*system, *conv.history, {"role": "user", "content": str(content)}]


def _prompt(conv: Conversation, content: str | list[int]) -> str | list[int]:
    """Completions endpoint: the conversation so far as plain text (token ids pass through untouched)."""
    if isinstance(content, list):
        return content
    parts = [conv.system or ""] + [m["content"] for m in conv.history] + [content]
    return "\n".join(p for p in parts if p)


async def run(
    target: Target,
    conversations: list[Conversation],
    arrival: Arrival,
    warmup: list[Conversation],
    seed: int = 0,
    duration_limit: float | None = None,
    progress: bool = True,
    label: str = "benchmark",
) -> RunResult:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=target.timeout_s) as client:
        warm = [
            await _conversation(client, target, c, None, time.monotonic(), None, warmup=True) for c in warmup
        ]
        total = sum(len(c.turns) for c in conversations)
        bar = tqdm(total=total, desc=label, unit="req", disable=not progress, leave=False)
        slots = asyncio.Semaphore(arrival.concurrency) if arrival.concurrency else None
        offsets = arrival.offsets(len(conversations), seed)
        start = time.monotonic()
        deadline = start + duration_limit if duration_limit is not None else None
        tasks = []
        for conv, offset in zip(conversations, offsets, strict=True):
            if duration_limit is not None and offset > duration_limit:
                break
            delay = start + float(offset) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if deadline is not None and time.monotonic() > deadline:
                break
            tasks.append(
                asyncio.create_task(_conversation(client, target, conv, slots, start, bar, deadline))
            )
        results = await asyncio.gather(*tasks)
        end = time.monotonic()
        bar.close()
    records = [r for conv_records in results for r in conv_records]
    first = min((r.start for r in records), default=0.0)
    return RunResult(records, max(end - start - first, 1e-9), arrival, [r for c in warm for r in c])


async def _conversation(
    client: httpx.AsyncClient,
    target: Target,
    conv: Conversation,
    slots: asyncio.Semaphore | None,
    start: float,
    bar: tqdm | None,
    deadline: float | None = None,
    warmup: bool = False,
) -> list[RequestRecord]:
    records = []
    conv.history = []
    for i, turn in enumerate(conv.turns):
        record = RequestRecord(
            index=conv.index * 1000 + i,
            conversation=conv.index,
            turn=i,
            warmup=warmup,
            expected_prompt_tokens=turn.content_tokens,
            expected_output_tokens=turn.output_len,
        )
        messages = _messages(conv, turn.content) if target.endpoint == "chat" else None
        prompt = _prompt(conv, turn.content)
        async with slots or contextlib.nullcontext():
            if deadline is not None and time.monotonic() > deadline:
                break  # the run's time is up: in-flight requests finish, no new one starts
            await send(client, target, record, prompt, messages, turn.output_len, start)
        records.append(record)
        if bar is not None:
            bar.update()
        if not record.ok:
            break  # a conversation does not go on past a failed turn
        conv.history += [
            {"role": "user", "content": str(turn.content)},
            {"role": "assistant", "content": record.text},
        ]
    return records
