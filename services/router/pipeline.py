"""One request across the workers: reserve on a decode worker, prefill (KV pushed), then stream decode tokens.

`Dispatcher.open()` runs everything up to the first token, so failures before it become proper HTTP errors; the
returned `GenerationStream` yields the tokens after it. Whatever ends a request early (client gone, worker
failure, timeout), `GenerationStream.close()` / the failure path aborts every leg: the prefill worker confirms no
KV write is in flight before the decode worker frees the blocks (otherwise the decode worker quarantines them).

Retries: a worker that fails by its own fault before the first token (unreachable, crashed, broken stream, a KV
transfer that failed) costs the request nothing the client saw, so the whole attempt is undone and made again
on other workers (`--retries`, with jittered exponential backoff), under a fresh request id (the workers keep the
old one's tombstone). Every such failure is counted by the worker's circuit breaker; a success resets it. After
the first token nothing is retried: the client has seen output.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from pdmesh.v1 import worker_pb2 as pb

from services.common.convert import logprob_from_proto, sampling_to_proto
from services.common.logprob import TokenLogprob
from services.common.sampling_params import SamplingParams
from services.router.errors import APIError, from_grpc
from services.router.workers import Worker, WorkerPool

# the worker did nothing wrong (the request or the client did): no retry, no breaker count
NOT_WORKER_FAULTS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.ALREADY_EXISTS,
    }
)


class WorkerFailed(Exception):
    """A worker failed a call by its own fault; `error` is what the client gets if no retry succeeds."""

    def __init__(self, worker: Worker, error: APIError) -> None:
        super().__init__(error.message)
        self.worker = worker
        self.error = error


def worker_fault(error: grpc.aio.AioRpcError) -> bool:
    return error.code() not in NOT_WORKER_FAULTS


log = logging.getLogger("pdmesh.router")


@dataclass(frozen=True)
class DispatchOptions:
    reserve_timeout_s: float = 10.0
    prefill_timeout_s: float = 600.0
    token_timeout_s: float = 120.0  # longest gap between two streamed chunks
    admission_timeout_s: float = 30.0  # how long to wait for KV capacity before answering 429
    abort_timeout_s: float = 35.0
    kv_checksum: bool = False
    retries: int = 2  # further attempts on other workers after a worker failure before the first token
    retry_backoff_s: float = 0.05  # first backoff; doubles per retry, with full jitter, at most 1 s


@dataclass
class Timings:
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    transfer_ms: float = 0.0
    first_decode_ms: float = 0.0
    router_ms: float = 0.0  # the rest: router work, admission waits, network (ttft minus the phases above)
    ttft_ms: float = 0.0  # request arrival at the router to the first token in hand

    def headers(self) -> dict[str, str]:
        return {f"x-pdmesh-{k.replace('_', '-')}": f"{v:.3f}" for k, v in self.__dict__.items()}


@dataclass
class Delta:
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None


@dataclass
class GenerationStream:
    request_id: str
    prompt_tokens: int
    started: float
    timings: Timings = field(default_factory=Timings)
    cached_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    pending: list[pb.TokenChunk] = field(default_factory=list)  # chunks already received
    call: grpc.aio.UnaryStreamCall | None = None
    leg: str = "decode"
    worker: Worker | None = None
    prefill_worker: Worker | None = None  # PD: the worker that computed the prompt
    pool: WorkerPool | None = None
    options: DispatchOptions = field(default_factory=DispatchOptions)
    deadline: float | None = None  # monotonic; past it the request ends with 504

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def affinity(self) -> dict[str, str]:
        """role -> address of the workers that hold this request's prompt in their cache."""
        held = {self.leg: self.worker} if self.worker is not None else {}
        if self.prefill_worker is not None:
            held["prefill"] = self.prefill_worker
        return {role: w.address for role, w in held.items()}

    async def __aiter__(self) -> AsyncIterator[Delta]:
        while not self.finished:
            chunk = self.pending.pop(0) if self.pending else await self.next_chunk()
            self.completion_tokens = chunk.completion_tokens or self.completion_tokens + len(chunk.token_ids)
            self.cached_tokens = max(self.cached_tokens, chunk.cached_tokens)
            if chunk.finished:
                self.finish_reason = (
                    "stop" if chunk.finish_reason == "stop" else chunk.finish_reason or "stop"
                )
            yield Delta(
                list(chunk.token_ids),
                chunk.text,
                [logprob_from_proto(lp) for lp in chunk.logprobs],
                self.finish_reason,
            )

    async def _read(self) -> pb.TokenChunk:
        """The next chunk; a failure of the worker's raises WorkerFailed (counted by its breaker)."""
        assert self.call is not None and self.worker is not None
        limit = self.options.token_timeout_s
        # NOTE: decided before waiting: event loop timers may fire a fraction of a millisecond early
        by_deadline = self.deadline is not None and self.deadline - time.monotonic() < limit
        if by_deadline:
            limit = self.deadline - time.monotonic()  # type: ignore[operator]
        try:
            async with asyncio.timeout(max(limit, 0.0)):  # NOTE: no task per token, as wait_for makes
                chunk = await self.call.read()
        except TimeoutError:
            if by_deadline:
                raise APIError(504, "the request ran past its deadline (--request-timeout or x-pdmesh-timeout)") from None  # fmt: skip
            error = APIError(
                504, f"the {self.leg} worker sent nothing for {self.options.token_timeout_s:.0f}s"
            )
            raise self._failed(error, "silent stream") from None
        except grpc.aio.AioRpcError as e:
            if not worker_fault(e):
                raise from_grpc(e, self.leg) from e
            raise self._failed(from_grpc(e, self.leg), e.details() or str(e.code()), e) from e
        if chunk is grpc.aio.EOF:
            error = APIError(502, f"the {self.leg} worker ended the stream before the request finished")
            raise self._failed(error, "stream ended early") from None
        return chunk

    def _failed(self, error: APIError, why: str, e: grpc.aio.AioRpcError | None = None) -> WorkerFailed:
        assert self.worker is not None
        if self.pool is not None:
            down = e is not None and e.code() == grpc.StatusCode.UNAVAILABLE
            self.pool.failed(self.worker, why, down=down)
        return WorkerFailed(self.worker, error)

    async def next_chunk(self) -> pb.TokenChunk:
        """After the first token: a worker failure is the client's error now (nothing can be retried)."""
        try:
            return await self._read()
        except WorkerFailed as e:
            raise e.error from None

    async def close(self) -> None:
        """Abort the decode leg if the request did not finish (idempotent)."""
        worker = self.worker
        if self.call is not None and not self.finished:
            self.call.cancel()
            if worker is not None and self.leg == "decode":
                # the prefill worker answered, so every KV write into these blocks has ended
                release = pb.ReleaseRequest(request_id=self.request_id, writer_done=True)
                await _quietly(lambda: worker.decode.Release(release, timeout=5))
            elif worker is not None:
                abort = pb.AbortRequest(request_id=self.request_id)
                await _quietly(lambda: worker.colocated.Abort(abort, timeout=5))
        self.call = None


async def _quietly(call: Callable[[], Awaitable[object]]) -> None:
    """A cleanup call whose failure changes nothing (the worker may be gone, its channel closing)."""
    try:
        await call()
    except (grpc.aio.AioRpcError, grpc.aio.UsageError, RuntimeError) as e:
        log.debug("cleanup call failed: %s", e)


class Dispatcher:
    def __init__(
        self, pool: WorkerPool, options: DispatchOptions, on_retry: Callable[[Worker], None] | None = None
    ) -> None:
        self.pool = pool
        self.options = options
        self.on_retry = on_retry

    async def open(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        deadline: float | None = None,
        affinity: dict[str, str] | None = None,
    ) -> GenerationStream:
        """Up to the first token in hand, retrying worker failures on other workers; APIError otherwise.
        `affinity`: role -> the address to use when it is usable (another sample of the same prompt's workers)."""
        started = time.monotonic()
        excluded: set[str] = set()
        failure: APIError | None = None  # of the last attempt
        for attempt in range(self.options.retries + 1):
            rid = request_id if attempt == 0 else f"{request_id}-retry{attempt}"
            try:
                stream = await self._attempt(rid, prompt, params, started, excluded, affinity or {})
            except APIError as e:
                # no other worker left to retry on: the client learns what went wrong with the last one
                raise failure if failure is not None and e.status == 503 else e from None
            except WorkerFailed as e:
                failure = e.error
                excluded.add(e.worker.address)
                backoff = random.uniform(0, min(1.0, self.options.retry_backoff_s * 2**attempt))
                late = deadline is not None and time.monotonic() + backoff >= deadline
                if attempt == self.options.retries or late:
                    raise e.error from None
                log.warning(
                    "%s: %s worker %s failed before the first token (%s); retrying on another",
                    request_id, e.worker.role, e.worker.address, e.error.message,
                )  # fmt: skip
                if self.on_retry is not None:
                    self.on_retry(e.worker)
                await asyncio.sleep(backoff)
                continue
            stream.deadline = deadline
            t = stream.timings
            t.ttft_ms = (time.monotonic() - started) * 1e3
            t.router_ms = max(0.0, t.ttft_ms - t.queue_ms - t.prefill_ms - t.transfer_ms - t.first_decode_ms)
            return stream
        raise AssertionError("unreachable")

    async def _attempt(
        self,
        rid: str,
        prompt: list[int],
        params: SamplingParams,
        started: float,
        excluded: set[str],
        affinity: dict[str, str],
    ) -> GenerationStream:
        if self.pool.mode == "colocated":
            stream = await self._open_colocated(rid, prompt, params, started, excluded, affinity)
        else:
            stream = await self._open_pd(rid, prompt, params, started, excluded, affinity)
        if stream.call is None:  # PD: the first token already ended the request
            return stream
        try:  # the first token is in hand before anything is sent to the client
            first = await stream._read()
        except BaseException:
            await stream.close()
            raise
        finally:
            if stream.leg == "colocated" and stream.worker is not None:
                stream.worker.settle()  # its prompt is computed (or abandoned)
        assert stream.worker is not None
        self.pool.succeeded(stream.worker)
        stream.pending.append(first)
        if first.HasField("timings"):
            ft = first.timings
            t = stream.timings
            t.queue_ms = t.queue_ms or ft.queue_ms
            t.prefill_ms = t.prefill_ms or ft.prefill_ms
            t.first_decode_ms = ft.first_decode_ms
        return stream

    async def _open_colocated(
        self,
        rid: str,
        prompt: list[int],
        params: SamplingParams,
        started: float,
        excluded: set[str],
        affinity: dict[str, str],
    ) -> GenerationStream:
        prefer = affinity.get("colocated")
        worker = await self.pool.pick_live("colocated", exclude=excluded, prompt=prompt, prefer=prefer)
        call = worker.colocated.Generate(
            pb.ColocatedRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling_to_proto(params))
        )
        return GenerationStream(
            rid,
            len(prompt),
            started,
            call=call,
            leg="colocated",
            worker=worker,
            pool=self.pool,
            options=self.options,
        )

    async def _open_pd(
        self,
        rid: str,
        prompt: list[int],
        params: SamplingParams,
        started: float,
        excluded: set[str],
        affinity: dict[str, str],
    ) -> GenerationStream:
        sampling = sampling_to_proto(params)
        decode, destination = await self._reserve(rid, prompt, sampling, excluded, affinity.get("decode"))
        try:
            prefer = affinity.get("prefill")
            prefill = await self.pool.pick_live("prefill", exclude=excluded, prompt=prompt, prefer=prefer)
        except BaseException:  # no prefill worker can take it (or the client left): nothing was written
            await asyncio.shield(self._release(decode, rid, writer_done=True))
            raise
        request = pb.PrefillRequest(
            request_id=rid,
            prompt_token_ids=prompt,
            sampling=sampling,
            destination=destination,
            kv_checksum=self.options.kv_checksum,
        )
        try:
            response = await prefill.prefill.Prefill(request, timeout=self.options.prefill_timeout_s)
        except BaseException as e:  # failed, cancelled (client gone) or anything unexpected
            prefill.settle()
            writer_done = await asyncio.shield(self._abort_prefill(prefill, rid))
            await asyncio.shield(self._release(decode, rid, writer_done))
            if not isinstance(e, grpc.aio.AioRpcError):
                raise
            if not worker_fault(e):
                raise from_grpc(e, "prefill") from e
            # ABORTED: the KV never landed (the write failed, or the decode worker's lease lapsed); the prefill
            # worker computed fine, so the destination takes the blame (else one bad decode worker would trip
            # every prefill worker's breaker)
            culprit = decode if e.code() == grpc.StatusCode.ABORTED else prefill
            down = e.code() == grpc.StatusCode.UNAVAILABLE
            self.pool.failed(culprit, e.details() or str(e.code()), down=down)
            raise WorkerFailed(culprit, from_grpc(e, "prefill")) from e
        prefill.settle()
        self.pool.succeeded(prefill)
        stream = GenerationStream(
            rid, len(prompt), started, worker=decode, pool=self.pool, options=self.options
        )
        stream.prefill_worker = prefill
        stream.cached_tokens = response.cached_tokens
        t = response.timings
        stream.timings = Timings(t.queue_ms, t.prefill_ms, t.transfer_ms)
        if response.finish_reason:  # the first token already ends the request: no decode needed
            await self._release(decode, rid, writer_done=True)
            stream.pending.append(
                pb.TokenChunk(
                    token_ids=[response.first_token],
                    text=response.text,
                    finished=True,
                    finish_reason=response.finish_reason,
                    stop_reason=response.stop_reason,
                    prompt_tokens=len(prompt),
                    completion_tokens=1,
                    cached_tokens=response.cached_tokens,
                    logprobs=[response.first_logprob] if response.HasField("first_logprob") else [],
                )
            )
            return stream
        generate = pb.GenerateRequest(request_id=rid, first_token=response.first_token)
        if response.HasField("kv_checksum"):
            generate.kv_checksum = response.kv_checksum
            generate.rank_kv_checksums.extend(response.rank_kv_checksums)
        if response.HasField("first_logprob"):
            generate.first_logprob.CopyFrom(response.first_logprob)
        stream.call = decode.decode.Generate(generate)
        return stream

    async def _reserve(
        self,
        rid: str,
        prompt: list[int],
        sampling: pb.SamplingParams,
        excluded: set[str],
        prefer: str | None = None,
    ) -> tuple[Worker, pb.KvDestination]:
        """A decode reservation; waits (up to admission_timeout_s) while every decode worker is full."""
        deadline = time.monotonic() + self.options.admission_timeout_s
        backoff = 0.01
        while True:
            full: set[str] = set()
            while True:
                try:
                    decode = await self.pool.pick_live(
                        "decode", exclude=excluded | full, prompt=prompt, prefer=prefer
                    )
                except APIError:
                    break
                request = pb.ReserveRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling)
                try:
                    reply = await decode.decode.Reserve(request, timeout=self.options.reserve_timeout_s)
                    self.pool.succeeded(decode)
                    return decode, reply.destination
                except grpc.aio.AioRpcError as e:
                    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        full.add(decode.address)
                        continue
                    # the worker may have reserved before the call failed (deadline): hold nothing for us
                    await asyncio.shield(self._release(decode, rid, writer_done=True))
                    if not worker_fault(e):
                        raise from_grpc(e, "decode") from e
                    down = e.code() == grpc.StatusCode.UNAVAILABLE
                    self.pool.failed(decode, e.details() or str(e.code()), down=down)
                    raise WorkerFailed(decode, from_grpc(e, "decode")) from e
                except BaseException:  # the client left mid-call: undo whatever the worker reserved
                    await asyncio.shield(self._release(decode, rid, writer_done=True))
                    raise
            if not full:
                raise APIError(503, "no healthy decode worker is available; check the workers and retry.")
            if time.monotonic() + backoff > deadline:
                raise APIError(
                    429,
                    f"every decode worker stayed full for {self.options.admission_timeout_s:.0f}s; retry later.",
                    retry_after=1,
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 0.5)

    async def _abort_prefill(self, prefill: Worker, rid: str) -> bool:
        """True when the prefill worker confirmed that no KV write for rid is in flight."""
        try:
            reply = await prefill.prefill.Abort(
                pb.AbortRequest(request_id=rid), timeout=self.options.abort_timeout_s
            )
            return reply.aborted
        except grpc.aio.AioRpcError:
            return False

    async def _release(self, decode: Worker, rid: str, writer_done: bool) -> None:
        release = pb.ReleaseRequest(request_id=rid, writer_done=writer_done)
        await _quietly(lambda: decode.decode.Release(release, timeout=5))
