"""The router's HTTP API: OpenAI-compatible completions and chat completions, models, health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
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
from services.router.admission import Admission
from services.router.breaker import STATE_VALUE
from services.router.discovery import resolver, split_addresses, watch_dns
from services.router.errors import APIError
from services.router.metrics import RouterMetrics
from services.router.openai_api import ChatCompletionRequest, CompletionRequest
from services.router.pipeline import Delta, Dispatcher, DispatchOptions, GenerationStream
from services.router.tool_calls import CallReader, ToolPlan, detect_format
from services.router.workers import ROLES, Worker, WorkerPool, static_members

log = logging.getLogger("pdmesh.router")
DISCONNECT_POLL_S = 0.25
TIMEOUT_HEADER = "x-pdmesh-timeout"
REPLICA = f"{socket.gethostname()}:{os.getpid()}"
MERGE_BUFFER = 4  # chunks waiting between the workers' streams of one request and its client


@dataclass(frozen=True)
class KubernetesDiscovery:
    selector: str  # pods of the fleet, e.g. app.kubernetes.io/instance=pdmesh
    namespace: str | None = None  # default: the router's own namespace
    port: int = 50051  # the workers' gRPC port
    role_label: str = "pdmesh.io/role"


@dataclass(frozen=True)
class RayDiscovery:
    deployment: str  # the worker actors `pdmesh ray up --name` started: DEPLOYMENT-prefill-0, ...
    namespace: str = "pdmesh"
    address: str = "auto"  # the Ray cluster, when the router is not itself one of its actors


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
    queue_timeout_s: float = 5.0  # how long a request beyond max_in_flight waits for a slot before 429
    request_timeout_s: float | None = None  # deadline of every request (a client may ask for less)
    max_prompts: int = 64  # prompts in one /v1/completions request
    worker_wait_s: float = 300.0
    poll_interval_s: float = 1.0  # how often the router's metrics of its workers are refreshed
    load_interval_s: float = 0.25  # how often each worker reports its load to each router
    policy: str = "kv_aware"
    tool_call_parser: str = "auto"  # auto (from the chat template) | hermes | llama3_json | none
    breaker_threshold: int = 3
    breaker_cooldown_s: float = 5.0
    dns_interval_s: float = 5.0
    dns_server: str | None = None
    kubernetes: KubernetesDiscovery | None = None
    ray: RayDiscovery | None = None
    dispatch: DispatchOptions = field(default_factory=DispatchOptions)

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name


class Router:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.tokenizer = Tokenizer(config.model)
        self.tool_format = (
            detect_format(self.tokenizer.chat_template)
            if config.tool_call_parser == "auto"
            else config.tool_call_parser
        )
        self.metrics = RouterMetrics()
        static: dict[str, list[str]] = {}
        self.dns_names = []
        for role, values in zip(ROLES, (config.prefill, config.decode, config.colocated), strict=True):
            static[role], names = split_addresses(role, values)
            self.dns_names += names
        if (
            not any(static.values())
            and not self.dns_names
            and config.kubernetes is None
            and config.ray is None
        ):
            raise ValueError(
                "no workers given: pass --prefill and --decode (or --colocated) addresses or dns:// names, "
                "--kubernetes-selector or --ray-deployment"
            )
        self.pool = WorkerPool(
            config.load_interval_s,
            policy=config.policy,
            on_select=self._selected,
            on_breaker=self._breaker_changed,
            breaker_threshold=config.breaker_threshold,
            breaker_cooldown_s=config.breaker_cooldown_s,
        )
        self.pool.set_members("static", static_members(static))
        self.dispatcher = Dispatcher(self.pool, config.dispatch, on_retry=self._retried)
        self.admission = Admission(config.max_in_flight, config.queue_timeout_s)
        self.ready = False
        self.startup_error: str | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._created = int(time.time())

    # ---- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.pool.start()
        if self.dns_names:
            r = resolver(self.config.dns_server)
            for name in self.dns_names:
                self.pool.follow_source(name.source, watch_dns(name, self.config.dns_interval_s, r))
        if self.config.kubernetes is not None:
            from services.router.discovery_kubernetes import watch_pods

            k = self.config.kubernetes
            pods = watch_pods(k.namespace, k.selector, k.port, k.role_label)
            self.pool.follow_source(f"kubernetes:{k.selector}", pods)
        if self.config.ray is not None:
            from services.router.discovery_ray import watch_actors

            ray = self.config.ray
            actors = watch_actors(ray.deployment, ray.namespace, ray.address)
            self.pool.follow_source(f"ray:{ray.namespace}/{ray.deployment}", actors)
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

    @property
    def in_flight(self) -> int:
        return self.admission.in_flight

    def _breaker_changed(self, worker: Worker, change: str) -> None:
        if change == "opened":
            self.metrics.breaker_trips.labels(worker.role, worker.address).inc()

    def _retried(self, worker: Worker) -> None:
        self.metrics.retries.labels(worker.role, worker.address).inc()

    def _selected(self, worker: Worker, prompt_tokens: int, cached_tokens: int) -> None:
        m = self.metrics
        m.selections.labels(worker.role, worker.address, self.config.policy).inc()
        m.routed_prompt_tokens.labels(worker.role, worker.address).inc(prompt_tokens)
        m.routed_cached_tokens.labels(worker.role, worker.address).inc(cached_tokens)

    async def _export_worker_metrics(self) -> None:
        m = self.metrics
        index = self.pool.index
        exported: set[tuple[str, str]] = set()
        while True:
            now = time.monotonic()
            current = {(w.role, w.address) for w in self.pool.workers}
            for labels in exported - current:  # a worker that left the fleet leaves the metrics too
                m.forget_worker(*labels)
            exported = current
            m.admission_waiting.set(self.admission.waiting)
            for w in self.pool.workers:
                labels = (w.role, w.address)
                m.worker_up.labels(*labels).set(1 if w.healthy else 0)
                m.breaker_state.labels(*labels).set(STATE_VALUE[w.breaker.state])
                m.kv_index_blocks.labels(*labels).set(index.blocks(w.address))
                if w.address in index.updated:
                    m.kv_events_age.labels(*labels).set(now - index.updated[w.address])
                if w.load is not None:
                    m.worker_kv_used.labels(*labels).set(w.load.used_blocks)
                    m.worker_kv_total.labels(*labels).set(w.load.total_blocks)
                    m.worker_running.labels(*labels).set(w.load.running)
                    m.worker_waiting.labels(*labels).set(w.load.waiting)
                    m.worker_bytes.labels(*labels).set(w.load.transferred_bytes)
                    m.export_replicas(w.role, w.address, w.load.replicas)
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
        missing = [r for r in self.pool.roles if not self.pool.of_role(r)]  # all left (discovery lists none)
        if missing:
            raise APIError(
                503, f"no healthy {' or '.join(missing)} worker is available; check the workers and retry."
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

    def deadline(self, request: Request) -> float | None:
        """When this request must be done (monotonic): --request-timeout, or sooner if the client asks."""
        limit = self.config.request_timeout_s
        asked = request.headers.get(TIMEOUT_HEADER)
        if asked is not None:
            try:
                seconds = float(asked)
            except ValueError:
                seconds = -1.0
            if not 0 < seconds < 1e9:
                raise APIError(400, f"the {TIMEOUT_HEADER} header must be a number of seconds > 0, got {asked!r}.")  # fmt: skip
            limit = seconds if limit is None else min(limit, seconds)
        return None if limit is None else time.monotonic() + limit

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
            {
                "role": w.role,
                "address": w.address,
                "healthy": w.healthy,
                "breaker": w.breaker.state,
                "error": w.refused or w.last_error,
            }
            for w in router.pool.workers
        ]
        ok = router.ready and router.pool.ready
        body = {
            "status": "ok" if ok else "unavailable",
            "mode": router.pool.mode,
            "replica": REPLICA,  # which router process answered (several may share the port)
            "workers": workers,
        }
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
        body.check_supported(router.tokenizer.vocab_size)
        prompts = _completion_prompts(router, body.prompt)
        samples = body.num_samples
        if len(prompts) * samples > router.config.max_prompts:
            raise APIError(
                400,
                f"{len(prompts)} prompts x {samples} samples is {len(prompts) * samples}; at most "
                f"{router.config.max_prompts} are served at once (--max-prompts): split the batch.",
                param="n",
            )
        ranked = samples > body.n  # best_of: every sample's logprobs, to keep the n most likely
        logprobs = body.logprobs if body.logprobs is not None or not ranked else 0
        plans = []
        for prompt in prompts:
            max_tokens = router.check_lengths(prompt, body.max_tokens, 16)
            plans.extend((prompt, p) for p in body.samples(body.sampling(max_tokens, logprobs)))
        spec = Spec(
            "completions",
            body.model,
            body.stream,
            body.include_usage,
            body.return_token_ids,
            samples,
            body.n,
            show_logprobs=body.logprobs is not None,
        )
        return await _serve(router, request, spec, plans)

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        router.check_model(body.model)
        body.check_supported(router.tokenizer.vocab_size)
        tools = body.tool_plan(router.tool_format)
        try:
            prompt = router.tokenizer.encode_chat(
                body.rendered_messages(),
                body.add_generation_prompt,
                tools=body.tools if tools.shown else None,
                **(body.chat_template_kwargs or {}),
            )
        except RequestError as e:
            raise APIError(400, str(e), param="messages") from e
        max_tokens = router.check_lengths(prompt, body.requested_max_tokens, None)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        plans = [(prompt, p) for p in body.samples(body.sampling(max_tokens, logprobs, tools))]
        spec = Spec(
            "chat",
            body.model,
            body.stream,
            body.include_usage,
            body.return_token_ids,
            body.n,
            body.n,
            tools=tools if tools.reads_calls else None,
        )
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
    if len(prompt) > router.config.max_prompts:
        raise APIError(
            400,
            f"{len(prompt)} prompts in one request; at most {router.config.max_prompts} are served at once "
            "(--max-prompts): split the batch.",
            param="prompt",
        )
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
    n: int = 1  # samples per prompt: plans come in groups of n samples of one prompt
    keep: int = 1  # choices returned per prompt: the `keep` most likely of its n samples (best_of)
    show_logprobs: bool = True  # False: logprobs were asked for only to rank the samples
    tools: ToolPlan | None = None  # chat: the tool calls to read from each choice's text

    @property
    def chat(self) -> bool:
        return self.endpoint == "chat"


def _usage(streams: list[GenerationStream], n: int) -> dict[str, Any]:
    """As OpenAI counts: each prompt once (its first sample's), every choice's completion tokens."""
    firsts = streams[::n]
    return R.usage(
        sum(s.prompt_tokens for s in firsts),
        sum(s.completion_tokens for s in streams),
        sum(s.cached_tokens for s in firsts),
    )


async def _serve(
    router: Router, request: Request, spec: Spec, plans: list[tuple[list[int], SamplingParams]]
) -> Response:
    rid = f"{'chatcmpl' if spec.chat else 'cmpl'}-{uuid.uuid4().hex}"
    deadline = router.deadline(request)
    try:
        await router.admission.acquire()
    except APIError as e:
        router.metrics.requests.labels(spec.endpoint, str(e.status)).inc()
        raise
    router.metrics.in_flight.inc()
    outcome = Outcome(router, spec.endpoint)
    started = time.monotonic()
    ids = [rid] if len(plans) == 1 else [f"{rid}-{i}" for i in range(len(plans))]
    opened: list[GenerationStream] = []
    try:
        opened = await _until_disconnected(request, _open_all(router, ids, plans, deadline, spec.n))
        if not spec.stream:
            body = await _until_disconnected(request, _collect(router, rid, spec, opened, started))
    except BaseException as e:
        outcome.status = str(getattr(e, "status", 499 if isinstance(e, asyncio.CancelledError) else 500))
        await outcome.end(opened)
        raise
    headers = {"x-request-id": rid, **opened[0].timings.headers()}
    if not spec.stream:
        await outcome.end(opened)
        return JSONResponse(body, headers=headers)
    events = _stream_events(router, rid, spec, opened, started, outcome)

    async def cleanup() -> None:
        await events.aclose()  # NOTE: runs the generator's cleanup now, not when it is collected
        await outcome.end(opened)

    return CleanStreamingResponse(events, cleanup, media_type="text/event-stream", headers=headers)


class Outcome:
    """One request's admission slot and final status, given back and counted exactly once."""

    def __init__(self, router: Router, endpoint: str) -> None:
        self.router = router
        self.endpoint = endpoint
        self.status = "499"  # until something else is known: a stream never started was abandoned
        self.ended = False

    async def end(self, streams: list[GenerationStream]) -> None:
        if self.ended:
            return
        self.ended = True
        for s in streams:
            self.router.spawn(s.close())
        self.router.admission.release()
        self.router.metrics.in_flight.dec()
        self.router.metrics.requests.labels(self.endpoint, self.status).inc()


class CleanStreamingResponse(StreamingResponse):
    """A streamed response whose cleanup runs however it ends, even when the client left before it began."""

    def __init__(self, content: AsyncIterator[str], cleanup: Callable[[], Awaitable[None]], **kwargs: Any):
        super().__init__(content, **kwargs)
        self._cleanup = cleanup

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await asyncio.shield(self._cleanup())


async def _open_all(
    router: Router,
    ids: list[str],
    plans: list[tuple[list[int], SamplingParams]],
    deadline: float | None,
    n: int = 1,
) -> list[GenerationStream]:
    """Every plan up to its first token, the prompts concurrently (in groups of n samples each); if one fails,
    the others are closed."""
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        async with asyncio.timeout(timeout):
            if len(plans) == 1:
                return [await router.dispatcher.open(ids[0], *plans[0], deadline)]
            groups = [
                _open_samples(router, ids[i : i + n], plans[i : i + n], deadline)
                for i in range(0, len(plans), n)
            ]
            return [s for group in await _all_or_none(router, groups) for s in group]
    except TimeoutError:
        raise APIError(504, "the request ran past its deadline before its first token") from None


async def _open_samples(
    router: Router, ids: list[str], plans: list[tuple[list[int], SamplingParams]], deadline: float | None
) -> list[GenerationStream]:
    """One prompt's samples: the first up to its first token, when its workers hold the prompt in their prefix
    caches; then the others on those workers, concurrently, each computing only its prompt's last block."""
    first = await router.dispatcher.open(ids[0], *plans[0], deadline)
    if len(plans) == 1:
        return [first]
    rest = [
        router.dispatcher.open(rid, prompt, params, deadline, first.affinity)
        for rid, (prompt, params) in zip(ids[1:], plans[1:], strict=True)
    ]
    try:
        return [first, *(s for group in await _all_or_none(router, [_one(r) for r in rest]) for s in group)]
    except BaseException:
        router.spawn(first.close())
        raise


async def _one(opening: Awaitable[GenerationStream]) -> list[GenerationStream]:
    return [await opening]


async def _all_or_none(
    router: Router, openings: list[Awaitable[list[GenerationStream]]]
) -> list[list[GenerationStream]]:
    """Run concurrently; if one fails (or this is cancelled), cancel the rest and close what was opened."""
    tasks = [asyncio.ensure_future(o) for o in openings]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        for r in await asyncio.gather(*tasks, return_exceptions=True):
            for stream in r if isinstance(r, list) else []:
                router.spawn(stream.close())
        raise


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
        if spec.tools is not None:
            reader = spec.tools.reader()
            reader.feed(choice["text"])
            reader.finish()
            choice["text"] = reader.message_content()
            choice["finish_reason"] = reader.finish_reason(s.finish_reason)
            if reader.calls:
                choice["tool_calls"] = reader.calls
        if spec.keep < spec.n:  # best_of: the mean logprob per token ranks the samples
            choice["_rank"] = sum(fmt.token_logprobs) / max(1, len(fmt.token_logprobs))
        if spec.return_token_ids:
            choice["token_ids"] = token_ids
        return choice

    choices = list(await asyncio.gather(*(one(i, s) for i, s in enumerate(streams))))
    if spec.keep < spec.n:
        choices = _best(choices, spec)
    timings = streams[0].timings
    if spec.chat:
        return R.chat_body(rid, spec.model, choices, _usage(streams, spec.n), timings)
    return R.completion_body(rid, spec.model, choices, _usage(streams, spec.n), timings)


def _best(choices: list[dict[str, Any]], spec: Spec) -> list[dict[str, Any]]:
    """Each prompt's `keep` samples of the highest log probability per token (OpenAI's best_of), in sample
    order, numbered again."""
    best = []
    for start in range(0, len(choices), spec.n):
        group = choices[start : start + spec.n]
        top = sorted(sorted(group, key=lambda c: -c["_rank"])[: spec.keep], key=lambda c: c["index"])
        best.extend(top)
    for index, c in enumerate(best):
        c["index"] = index
        del c["_rank"]
        if not spec.show_logprobs:
            c["logprobs"] = None
    return best


async def _merged(streams: list[GenerationStream]) -> AsyncIterator[tuple[int, Delta | None]]:
    """(index, delta) from every stream as they come, and (index, None) when one ends; a stream's error is raised.
    One stream (the common case) is read directly: no task and no queue between it and the client."""
    if len(streams) == 1:
        async for d in streams[0]:
            yield 0, d
        yield 0, None
        return
    # NOTE: bounded, so a client that reads slowly stops the reads from the workers instead of growing memory
    queue: asyncio.Queue[tuple[int, Delta | BaseException | None]] = asyncio.Queue(MERGE_BUFFER)

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


def _chat_chunks(
    rid: str,
    spec: Spec,
    created: int,
    index: int,
    item: Delta,
    reader: CallReader | None,
    logprobs: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    """One worker delta as chat chunks. Without tool calls to read: one chunk with its text. With them: the
    content and tool-call deltas its text completes, the logprobs on the first, the finish reason on the last;
    none while a call is still arriving and there is nothing else to send."""
    if reader is None:
        delta = {"content": item.text} if item.text or not item.finish_reason else {}
        return [R.chat_chunk(rid, spec.model, created, delta, index, item.finish_reason, logprobs)]
    deltas = reader.feed(item.text)
    if item.finish_reason:
        deltas += reader.finish()
    elif not deltas and logprobs is None and not spec.return_token_ids:
        return []
    deltas = deltas or [{}]
    finish = reader.finish_reason(item.finish_reason)
    return [
        R.chat_chunk(
            rid,
            spec.model,
            created,
            delta,
            index,
            finish if i == len(deltas) - 1 else None,
            logprobs if i == 0 else None,
        )
        for i, delta in enumerate(deltas)
    ]


async def _stream_events(
    router: Router, rid: str, spec: Spec, streams: list[GenerationStream], started: float, outcome: Outcome
) -> AsyncIterator[str]:
    created = int(time.time())
    outcome.status = "200"
    try:
        if spec.chat:
            for index in range(len(streams)):
                yield R.sse(
                    R.chat_chunk(rid, spec.model, created, {"role": "assistant", "content": ""}, index)
                )
        fmts = [R.LogprobFormatter(router.tokenizer, spec.chat) for _ in streams]
        readers = [spec.tools.reader() if spec.tools else None for _ in streams]
        ttfts: list[float | None] = [None] * len(streams)
        sent: list[float | None] = [None] * len(streams)  # when each stream's last chunk went out
        itl = router.metrics.itl
        async with contextlib.aclosing(_merged(streams)) as merged:  # NOTE: closed at once on a disconnect
            async for index, item in merged:
                now = time.monotonic()
                if item is None:
                    router.observe(streams[index], ttfts[index] or 0.0, now - started)
                    continue
                if sent[index] is None:
                    ttfts[index] = now - started
                else:
                    itl.observe(now - sent[index])  # type: ignore[operator]
                sent[index] = now
                lp = fmts[index].add(item.logprobs)
                if spec.chat:
                    chunks = _chat_chunks(rid, spec, created, index, item, readers[index], lp)
                else:
                    chunks = [
                        R.completion_chunk(rid, spec.model, created, index, item.text, item.finish_reason, lp)
                    ]
                if spec.return_token_ids and chunks:
                    chunks[0]["choices"][0]["token_ids"] = item.token_ids
                for chunk in chunks:
                    yield R.sse(chunk)
        if spec.include_usage:
            yield R.sse(
                {
                    "id": rid,
                    "object": "chat.completion.chunk" if spec.chat else "text_completion",
                    "created": created,
                    "model": spec.model,
                    "choices": [],
                    "usage": _usage(streams, spec.n),
                    "timings": R.timings_body(streams[0].timings),
                }
            )
        yield R.sse("[DONE]")
    except APIError as e:
        outcome.status = str(e.status)
        yield R.sse(e.body())
        yield R.sse("[DONE]")
    except (asyncio.CancelledError, GeneratorExit):
        outcome.status = "499"
        raise
