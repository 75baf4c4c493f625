"""A reader that fell behind its request's outputs gets them merged into one (one message, not one per token),
without reordering, losing a token, or holding back an error or the end."""

from __future__ import annotations

import asyncio

import pytest

from services.engine.async_engine import AsyncEngine, EngineFailure
from services.engine.engine import RequestOutput


def out(tokens: list[int], finished: bool = False, queue_s: float | None = None) -> RequestOutput:
    return RequestOutput(
        "r", tokens, "".join(f"<{t}>" for t in tokens), finished, "length" if finished else None, None,
        4, 0, 0, queue_s=queue_s,
    )  # fmt: skip


def test_piled_up_outputs_merge_and_the_end_is_kept() -> None:
    async def run() -> list[RequestOutput]:
        engine = AsyncEngine(None)  # type: ignore[arg-type]  # outputs() never touches the engine
        stream = engine.open_stream("r")
        for item in (out([1], queue_s=0.5), out([2]), out([3])):
            stream.put_nowait(item)
        got = []
        async for o in engine.outputs(stream):
            got.append(o)
            if len(got) == 1:
                stream.put_nowait(out([4], finished=True))
                stream.put_nowait(out([99]))  # after the end: never read
        return got

    got = asyncio.run(run())
    assert [o.new_token_ids for o in got] == [[1, 2, 3], [4]]
    assert got[0].new_text == "<1><2><3>" and got[0].queue_s == 0.5 and not got[0].finished
    assert got[1].finished and got[1].finish_reason == "length"


def test_an_error_behind_piled_outputs_is_raised() -> None:
    async def run() -> list[list[int]]:
        engine = AsyncEngine(None)  # type: ignore[arg-type]
        stream = engine.open_stream("r")
        stream.put_nowait(out([1]))
        stream.put_nowait(EngineFailure("boom"))
        return [o.new_token_ids async for o in engine.outputs(stream)]

    with pytest.raises(EngineFailure):
        asyncio.run(run())
