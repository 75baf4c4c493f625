"""The router's HTTP API: OpenAI-compatible completions and chat completions, models, health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.errors import RequestError
from services.common.sampling_params import SamplingParams
from services.common.tokenizer import Tokenizer
from services.router import responses as R
from services.router.errors import APIError
from services.router.metrics import RouterMetrics
from services.router.openai_api import ChatCompletionRequest, CompletionRequest
from services.router.pipeline import Delta, Dispatcher, DispatchOptions, GenerationStream
from services.router.workers import Worker, WorkerPool

log = logging.getLogger("pdmesh.router")
DISCONNECT_POLL_S = 0.25


@dataclass(frozen=True)
class RouterConfig:
    model: str  # checkpoint directory: tokenizer and chat template
    prefill: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    colocated: tuple[str, ...] = ()
    served_model_name: str | None = None
    api_key: str | None = None
    metrics_need_key: bool = False  # /metrics behind the API key too
    max_in_flight: int = 4096
    worker_wait_s: float = 300.0
    poll_interval_s: float = 1.0
    policy: str = "kv_aware"
    dispatch: DispatchOptions = field(default_factory=DispatchOptions)

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name


class Router:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.tokenizer = Tokenizer(config.model)
        self.metrics = RouterMetrics()
        self.pool = WorkerPool.from_addresses(
            {
                "prefill": list(config.prefill),
                "decode": list(config.decode),
                "colocated": list(config.colocated),
            },
            config.poll_interval_s,
            config.policy,
            self._selected,
        )
        self.dispatcher = Dispatcher(self.pool, config.dispatch)
        self.in_flight = 0
        self.ready = False
        self.startup_error: str | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._created = int(time.time())

    # ---- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.pool.start()
        self.spawn(self._become_ready())
        self.spawn(self._export_worker_metrics())

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
        await self.pool.close()

    async def _become_ready(self) -> None:
        try:
            await self.pool.wait_ready(self.config.worker_wait_s)
            self.ready = True
            log.info("router ready: %s mode, %d workers", self.pool.mode, len(self.pool.workers))
        except (TimeoutError, ValueError) as e:
            self.startup_error = str(e)
            log.error("router not ready: %s", e)

    def _selected(self, worker: Worker, prompt_tokens: int, cached_tokens: int) -> None:
        m = self.metrics
        m.selections.labels(worker.role, worker.address, self.config.policy).inc()
        m.routed_prompt_tokens.labels(worker.role).inc(prompt_tokens)
        m.routed_cached_tokens.labels(worker.role).inc(cached_tokens)

    async def _export_worker_metrics(self) -> None:
        m = self.metrics
        index = self.pool.index
        while True:
            now = time.monotonic()
            for w in self.pool.workers:
                labels = (w.role, w.address)
                m.worker_up.labels(*labels).set(1 if w.healthy else 0)
                m.kv_index_blocks.labels(*labels).set(index.blocks(w.address))
                if w.address in index.updated:
                    m.kv_events_age.labels(*labels).set(now - index.updated[w.address])
                if w.load is not None:
                    m.worker_kv_used.labels(*labels).set(w.load.used_blocks)
                    m.worker_kv_total.labels(*labels).set(w.load.total_blocks)
                    m.worker_running.labels(*labels).set(w.load.running)
                    m.worker_bytes.labels(*labels).set(w.load.transferred_bytes)
            await asyncio.sleep(self.config.poll_interval_s)

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- request preparation -----------------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        if model != self.config.model_name:
            raise APIError(
                404,
                f"The model `{model}` does not exist; this router serves `{self.config.model_name}`.",
                param="model",
                code="model_not_found",
            )
        if not self.ready:
            raise APIError(
                503, self.startup_error or "the router is still waiting for its workers; retry shortly."
            )

    def check_lengths(self, prompt: list[int], requested: int | None, default: int | None) -> int:
        """The max_tokens to use; 400 when prompt plus output cannot fit."""
        limit = self.pool.max_model_len
        if not prompt:
            raise APIError(400, "the prompt is empty.", param="prompt")
        if len(prompt) >= limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, your prompt has "
                f"{len(prompt)} tokens. Please shorten it.",
                param="prompt",
                code="context_length_exceeded",
            )
        if requested is not None and requested < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {requested}.", param="max_tokens")
        room = limit - len(prompt)
        if requested is not None and requested > room:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(prompt) + requested} tokens ({len(prompt)} in the prompt, {requested} for the "
                "completion). Reduce the prompt or max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return requested if requested is not None else min(room, default or room)

    def validate_token_ids(self, ids: list[int]) -> None:
        vocab = self.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"token ids must be in [0, {vocab}).", param="prompt")

    @contextlib.asynccontextmanager
    async def admitted(self, endpoint: str) -> AsyncIterator[None]:
        if self.in_flight >= self.config.max_in_flight:
            self.metrics.requests.labels(endpoint, "429").inc()
            raise APIError(
                429,
                f"the router is at its limit of {self.config.max_in_flight} requests in flight; retry later.",
                retry_after=1,
            )
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()

    def observe(self, stream: GenerationStream, ttft: float, e2e: float) -> None:
        m = self.metrics
        m.prompt_tokens.inc(stream.prompt_tokens)
        m.generation_tokens.inc(stream.completion_tokens)
        m.cached_tokens.inc(stream.cached_tokens)
        m.ttft.observe(ttft)
        m.e2e.observe(e2e)
        if stream.completion_tokens > 1:
            m.tpot.observe((e2e - ttft) / (stream.completion_tokens - 1))
        t = stream.timings
        for phase, ms in (
            ("queue", t.queue_ms),
            ("prefill", t.prefill_ms),
            ("transfer", t.transfer_ms),
            ("first_decode", t.first_decode_ms),
            ("router", t.router_ms),
        ):
            m.phase.labels(phase).observe(ms / 1e3)


async def _until_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await work; if the client goes away first, cancel it (which aborts every worker leg)."""
    task = asyncio.ensure_future(work)
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not done and await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise APIError(499, "the client closed the connection")
    return task.result()


def create_app(config: RouterConfig) -> FastAPI:
    router = Router(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await router.start()
        yield
        await router.stop()

    app = FastAPI(title="pdmesh router", lifespan=lifespan)
    app.state.router = router

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        return APIError(400, f"{where}: {message}" if where else message, param=where or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return APIError(e.status_code, str(e.detail)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return APIError(500, f"internal error: {e}").response()

    # NOTE: a dependency, not an HTTP middleware: Starlette's BaseHTTPMiddleware hides client disconnects from
    # handlers, and disconnects are how abandoned requests get aborted
    expected = f"Bearer {config.api_key}".encode() if config.api_key else b""

    async def require_api_key(request: Request) -> None:
        # NOTE: compared in constant time, so response timing does not reveal how much of a guess was right
        sent = request.headers.get("authorization", "").encode()
        if expected and not hmac.compare_digest(sent, expected):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>').")

    v1 = [Depends(require_api_key)]

    @app.get("/health")
    async def health() -> JSONResponse:
        workers = [
            {"role": w.role, "address": w.address, "healthy": w.healthy, "error": w.last_error}
            for w in router.pool.workers
        ]
        ok = router.ready and router.pool.ready
        body = {"status": "ok" if ok else "unavailable", "mode": router.pool.mode, "workers": workers}
        if router.startup_error:
            body["error"] = router.startup_error
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", dependencies=v1 if config.metrics_need_key else [])
    async def metrics() -> Response:
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=v1)
    async def models() -> dict[str, Any]:
        card = {
            "id": config.model_name,
            "object": "model",
            "created": router._created,
            "owned_by": "pdmesh",
            "max_model_len": router.pool.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", dependencies=v1)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        router.check_model(body.model)
        body.check_supported()
        prompts = _completion_prompts(router, body.prompt)
        plans = []
        for prompt in prompts:
            max_tokens = router.check_lengths(prompt, body.max_tokens, 16)
            plans.append((prompt, body.sampling(max_tokens, body.logprobs)))
        spec = Spec("completions", body.model, body.stream, body.include_usage, body.return_token_ids)
        return await _serve(router, request, spec, plans)

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        router.check_model(body.model)
        body.check_supported()
        try:
            prompt = router.tokenizer.encode_chat(
                body.rendered_messages(),
                body.add_generation_prompt,
                tools=body.tools,
                **(body.chat_template_kwargs or {}),
            )
        except RequestError as e:
            raise APIError(400, str(e), param="messages") from e
        max_tokens = router.check_lengths(prompt, body.requested_max_tokens, None)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        plans = [(prompt, body.sampling(max_tokens, logprobs))]
        spec = Spec("chat", body.model, body.stream, body.include_usage, body.return_token_ids)
        return await _serve(router, request, spec, plans)

    return app


def _completion_prompts(
    router: Router, prompt: str | list[str] | list[int] | list[list[int]]
) -> list[list[int]]:
    if isinstance(prompt, str):
        return [router.tokenizer.encode(prompt)]
    if not prompt:
        raise APIError(400, "the prompt is empty.", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        ids = list(prompt)  # type: ignore[arg-type]
        router.validate_token_ids(ids)
        return [ids]
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append(router.tokenizer.encode(p))
        else:
            router.validate_token_ids(list(p))  # type: ignore[arg-type]
            out.append(list(p))  # type: ignore[arg-type]
    return out


@dataclass(frozen=True)
class Spec:
    """How to answer one HTTP request."""

    endpoint: str  # completions | chat
    model: str
    stream: bool
    include_usage: bool
    return_token_ids: bool

    @property
    def chat(self) -> bool:
        return self.endpoint == "chat"


def _usage(streams: list[GenerationStream]) -> dict[str, Any]:
    return R.usage(
        sum(s.prompt_tokens for s in streams),
        sum(s.completion_tokens for s in streams),
        sum(s.cached_tokens for s in streams),
    )


async def _serve(
    router: Router, request: Request, spec: Spec, plans: list[tuple[list[int], SamplingParams]]
) -> Response:
    rid = f"{'chatcmpl' if spec.chat else 'cmpl'}-{uuid.uuid4().hex}"
    async with router.admitted(spec.endpoint):
        started = time.monotonic()
        ids = [rid] if len(plans) == 1 else [f"{rid}-{i}" for i in range(len(plans))]
        opened: list[GenerationStream] = []
        try:
            for sub_id, (prompt, params) in zip(ids, plans, strict=True):
                opened.append(
                    await _until_disconnected(request, router.dispatcher.open(sub_id, prompt, params))
                )
            if not spec.stream:
                body = await _until_disconnected(request, _collect(router, rid, spec, opened, started))
        except BaseException as e:
            for s in opened:
                router.spawn(s.close())
            router.metrics.requests.labels(spec.endpoint, str(getattr(e, "status", 500))).inc()
            raise
        headers = {"x-request-id": rid, **opened[0].timings.headers()}
        if not spec.stream:
            router.metrics.requests.labels(spec.endpoint, "200").inc()
            return JSONResponse(body, headers=headers)
    # the stream holds its own admission slot until it ends
    router.in_flight += 1
    router.metrics.in_flight.inc()
    events = _stream_events(router, rid, spec, opened, started)
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


async def _collect(
    router: Router, rid: str, spec: Spec, streams: list[GenerationStream], started: float
) -> dict[str, Any]:
    async def one(index: int, s: GenerationStream) -> dict[str, Any]:
        text: list[str] = []
        token_ids: list[int] = []
        fmt = R.LogprobFormatter(router.tokenizer, spec.chat)
        ttft = None
        async for d in s:
            ttft = ttft if ttft is not None else time.monotonic() - started
            text.append(d.text)
            token_ids.extend(d.token_ids)
            fmt.add(d.logprobs)
        router.observe(s, ttft or 0.0, time.monotonic() - started)
        choice: dict[str, Any] = {
            "index": index,
            "text": "".join(text),
            "logprobs": fmt.body() if fmt.offsets or fmt.content else None,
            "finish_reason": s.finish_reason,
        }
        if spec.return_token_ids:
            choice["token_ids"] = token_ids
        return choice

    choices = list(await asyncio.gather(*(one(i, s) for i, s in enumerate(streams))))
    timings = streams[0].timings
    if spec.chat:
        c = choices[0]
        body = R.chat_body(
            rid, spec.model, c["text"], c["finish_reason"], c["logprobs"], _usage(streams), timings
        )
        if spec.return_token_ids:
            body["choices"][0]["token_ids"] = c["token_ids"]
        return body
    return R.completion_body(rid, spec.model, choices, _usage(streams), timings)


async def _merged(streams: list[GenerationStream]) -> AsyncIterator[tuple[int, Delta | None]]:
    """(index, delta) from every stream as they come, and (index, None) when one ends; a stream's error is raised.
    One stream (the common case) is read directly: no task and no queue between it and the client."""
    if len(streams) == 1:
        async for d in streams[0]:
            yield 0, d
        yield 0, None
        return
    queue: asyncio.Queue[tuple[int, Delta | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, s: GenerationStream) -> None:
        try:
            async for d in s:
                await queue.put((index, d))
        except BaseException as e:
            await queue.put((index, e))
            return
        await queue.put((index, None))

    pumps = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                remaining -= 1
            yield index, item
    finally:
        for p in pumps:
            p.cancel()


async def _stream_events(
    router: Router, rid: str, spec: Spec, streams: list[GenerationStream], started: float
) -> AsyncIterator[str]:
    created = int(time.time())
    status = "200"
    try:
        if spec.chat:
            yield R.sse(R.chat_chunk(rid, spec.model, created, {"role": "assistant", "content": ""}))
        fmts = [R.LogprobFormatter(router.tokenizer, spec.chat) for _ in streams]
        ttfts: list[float | None] = [None] * len(streams)
        async with contextlib.aclosing(_merged(streams)) as merged:  # NOTE: closed at once on a disconnect
            async for index, item in merged:
                if item is None:
                    router.observe(streams[index], ttfts[index] or 0.0, time.monotonic() - started)
                    continue
                ttfts[index] = ttfts[index] if ttfts[index] is not None else time.monotonic() - started
                lp = fmts[index].add(item.logprobs)
                if spec.chat:
                    delta = {"content": item.text} if item.text or not item.finish_reason else {}
                    chunk = R.chat_chunk(rid, spec.model, created, delta, item.finish_reason, lp)
                else:
                    chunk = R.completion_chunk(
                        rid, spec.model, created, index, item.text, item.finish_reason, lp
                    )
                if spec.return_token_ids:
                    chunk["choices"][0]["token_ids"] = item.token_ids
                yield R.sse(chunk)
        if spec.include_usage:
            yield R.sse(
                {
                    "id": rid,
                    "object": "chat.completion.chunk" if spec.chat else "text_completion",
                    "created": created,
                    "model": spec.model,
                    "choices": [],
                    "usage": _usage(streams),
                    "timings": R.timings_body(streams[0].timings),
                }
            )
        yield R.sse("[DONE]")
    except APIError as e:
        status = str(e.status)
        yield R.sse(e.body())
        yield R.sse("[DONE]")
    except asyncio.CancelledError:
        status = "499"
        raise
    finally:
        for s in streams:
            router.spawn(s.close())
        router.metrics.requests.labels(spec.endpoint, status).inc()
        router.in_flight -= 1
        router.metrics.in_flight.dec()
