"""Drive an Engine from asyncio: the engine steps on its own thread; callers submit calls and read streams.

The engine is not thread-safe, so every call that touches it runs on the engine thread, between steps
(`await call(fn, ...)`, or `post(fn, ...)` when nobody waits for it). Each request's outputs go to its own
asyncio queue, a step's outputs in one hop to the event loop; a reader that fell behind gets what piled up as
one merged output (one message to send, not one per token). If a step raises, every open stream receives the
error and the engine aborts those requests, so no caller hangs and no block leaks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from services.engine.engine import RequestOutput
from services.engine.interface import ServingEngine

log = logging.getLogger("pdmesh.engine")
T = TypeVar("T")
IDLE_WAIT_S = 0.05


class EngineFailure(RuntimeError):
    """A step of the engine raised; the affected requests were aborted."""


class AsyncEngine:
    def __init__(
        self, engine: ServingEngine, after_step: Callable[[list[RequestOutput]], None] | None = None
    ) -> None:
        self.engine = engine
        self.after_step = after_step
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.Future[Any] | None] | None] = (
            queue.SimpleQueue()
        )
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.num_steps = 0
        self.last_step_at = time.monotonic()  # when the last step ended (or the engine started)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._calls.put(None)
        if self._thread is not None:
            self._thread.join(timeout=10)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) on the engine thread between steps and return its result (or raise its exception)."""
        assert self._loop is not None, "start() first"
        future: asyncio.Future[T] = self._loop.create_future()
        self._calls.put((lambda: fn(*args), future))
        return await future

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn(*args) on the engine thread between steps, without waiting for it (errors are logged)."""

        def run() -> None:
            try:
                fn(*args)
            except Exception:
                log.exception("engine call %s failed", getattr(fn, "__name__", fn))

        self._calls.put((run, None))

    def open_stream(self, request_id: str) -> asyncio.Queue[RequestOutput | BaseException]:
        q: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = q
        return q

    async def outputs(
        self, stream: asyncio.Queue[RequestOutput | BaseException]
    ) -> AsyncIterator[RequestOutput]:
        """A request's outputs from its stream until it finishes; raises EngineFailure if a step failed."""
        while True:
            item = await stream.get()
            while not isinstance(item, BaseException) and not item.finished and not stream.empty():
                following = stream.get_nowait()
                if isinstance(following, BaseException):
                    item = following
                    break
                item = merge_outputs(item, following)
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                return

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    # ---- engine thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            self._run_calls(block=not self.engine.has_unfinished())
            if self._stopping or not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
                self.num_steps += 1
                self.last_step_at = time.monotonic()
                if self.after_step is not None:
                    self.after_step(outputs)
            except Exception as e:  # a failed step must not hang the requests in it
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            if outputs and self._loop is not None:
                self._loop.call_soon_threadsafe(self._deliver_step, outputs)

    def _run_calls(self, block: bool) -> None:
        try:
            item = self._calls.get(timeout=IDLE_WAIT_S) if block else self._calls.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            fn, future = item
            try:
                result = fn()
            except BaseException as e:
                self._resolve(future, None, e)
            else:
                self._resolve(future, result, None)
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return
        self._stopping = True

    def _resolve(self, future: asyncio.Future[Any] | None, result: Any, error: BaseException | None) -> None:
        if future is None:  # posted: nobody waits
            return

        def settle() -> None:
            if future.cancelled():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        assert self._loop is not None
        self._loop.call_soon_threadsafe(settle)

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """On the event loop: every output of one step to its stream."""
        for out in outputs:
            q = self._streams.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        q = self._streams.get(request_id)
        if q is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(q.put_nowait, item)

    def _fail_all(self, error: Exception) -> None:
        failure = EngineFailure(f"the engine failed while running this request: {error}")
        for request_id in list(self.engine.seqs):
            self.engine.abort(request_id)
            self._deliver(request_id, failure)


def merge_outputs(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """Two consecutive outputs of one request as one: b's state, both steps' tokens (a's first-token timings)."""
    return dataclasses.replace(
        b,
        new_token_ids=a.new_token_ids + b.new_token_ids,
        new_text=a.new_text + b.new_text,
        new_logprobs=a.new_logprobs + b.new_logprobs,
        queue_s=a.queue_s if a.queue_s is not None else b.queue_s,
        prefill_s=a.prefill_s if a.prefill_s is not None else b.prefill_s,
        emitted=a.emitted,
    )
