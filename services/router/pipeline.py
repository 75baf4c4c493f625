"""One request across the workers: reserve on a decode worker, prefill (KV pushed), then stream decode tokens.

`Dispatcher.open()` runs everything up to the first token, so failures before it become proper HTTP errors; the
returned `GenerationStream` yields the tokens after it. Whatever ends a request early (client gone, worker
failure, timeout), `GenerationStream.close()` / the failure path aborts every leg: the prefill worker confirms no
KV write is in flight before the decode worker frees the blocks (otherwise the decode worker quarantines them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from pdmesh.v1 import worker_pb2 as pb

from services.common.convert import logprob_from_proto, sampling_to_proto
from services.common.logprob import TokenLogprob
from services.common.sampling_params import SamplingParams
from services.router.errors import APIError, from_grpc
from services.router.workers import Worker, WorkerPool

log = logging.getLogger("pdmesh.router")


@dataclass(frozen=True)
class DispatchOptions:
    reserve_timeout_s: float = 10.0
    prefill_timeout_s: float = 600.0
    token_timeout_s: float = 120.0  # longest gap between two streamed chunks
    admission_timeout_s: float = 30.0  # how long to wait for KV capacity before answering 429
    abort_timeout_s: float = 35.0
    kv_checksum: bool = False


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
    pool: WorkerPool | None = None
    options: DispatchOptions = field(default_factory=DispatchOptions)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    async def __aiter__(self) -> AsyncIterator[Delta]:
        while not self.finished:
            chunk = self.pending.pop(0) if self.pending else await self._read()
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
        assert self.call is not None
        try:
            async with asyncio.timeout(
                self.options.token_timeout_s
            ):  # NOTE: no task per token, as wait_for makes
                chunk = await self.call.read()
        except TimeoutError:
            raise APIError(
                504, f"the {self.leg} worker sent nothing for {self.options.token_timeout_s:.0f}s"
            ) from None
        except grpc.aio.AioRpcError as e:
            if self.pool is not None and self.worker is not None and e.code() == grpc.StatusCode.UNAVAILABLE:
                self.pool.mark_down(self.worker, e.details() or "unavailable")
            raise from_grpc(e, self.leg) from e
        if chunk is grpc.aio.EOF:
            raise APIError(502, f"the {self.leg} worker ended the stream before the request finished")
        return chunk

    async def close(self) -> None:
        """Abort the decode leg if the request did not finish (idempotent)."""
        if self.call is not None and not self.finished:
            self.call.cancel()
            if self.worker is not None and self.leg == "decode":
                # the prefill worker answered, so every KV write into these blocks has ended
                release = pb.ReleaseRequest(request_id=self.request_id, writer_done=True)
                await _quietly(self.worker.decode.Release(release, timeout=5))
            elif self.worker is not None:
                await _quietly(
                    self.worker.colocated.Abort(pb.AbortRequest(request_id=self.request_id), timeout=5)
                )
        self.call = None


async def _quietly(awaitable) -> None:  # type: ignore[no-untyped-def]
    try:
        await awaitable
    except grpc.aio.AioRpcError as e:
        log.debug("cleanup call failed: %s", e.details())


class Dispatcher:
    def __init__(self, pool: WorkerPool, options: DispatchOptions) -> None:
        self.pool = pool
        self.options = options

    async def open(self, request_id: str, prompt: list[int], params: SamplingParams) -> GenerationStream:
        started = time.monotonic()
        if self.pool.mode == "colocated":
            stream = await self._open_colocated(request_id, prompt, params, started)
        else:
            stream = await self._open_pd(request_id, prompt, params, started)
        if stream.call is not None:  # the first token is in hand before anything is sent to the client
            try:
                first = await stream._read()
            except BaseException:
                await stream.close()
                raise
            finally:
                if stream.leg == "colocated" and stream.worker is not None:
                    stream.worker.settle()  # its prompt is computed (or abandoned)
            stream.pending.append(first)
            if first.HasField("timings"):
                ft = first.timings
                t = stream.timings
                t.queue_ms = t.queue_ms or ft.queue_ms
                t.prefill_ms = t.prefill_ms or ft.prefill_ms
                t.first_decode_ms = ft.first_decode_ms
        t = stream.timings
        t.ttft_ms = (time.monotonic() - started) * 1e3
        t.router_ms = max(0.0, t.ttft_ms - t.queue_ms - t.prefill_ms - t.transfer_ms - t.first_decode_ms)
        return stream

    async def _open_colocated(
        self, rid: str, prompt: list[int], params: SamplingParams, started: float
    ) -> GenerationStream:
        worker = await self.pool.pick_live("colocated", prompt=prompt)
        call = worker.colocated.Generate(
            pb.ColocatedRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling_to_proto(params))
        )
        stream = GenerationStream(
            rid,
            len(prompt),
            started,
            call=call,
            leg="colocated",
            worker=worker,
            pool=self.pool,
            options=self.options,
        )
        return stream

    async def _open_pd(
        self, rid: str, prompt: list[int], params: SamplingParams, started: float
    ) -> GenerationStream:
        sampling = sampling_to_proto(params)
        decode, destination = await self._reserve(rid, prompt, sampling)
        tried: set[str] = set()
        while True:
            try:
                prefill = await self.pool.pick_live("prefill", exclude=tried, prompt=prompt)
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
                prefill.settle()
                break
            except grpc.aio.AioRpcError as e:
                prefill.settle()
                writer_done = await asyncio.shield(self._abort_prefill(prefill, rid))
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    self.pool.mark_down(prefill, e.details() or "unavailable")
                    tried.add(prefill.address)
                    if any(w.healthy and w.address not in tried for w in self.pool.of_role("prefill")):
                        log.warning(
                            "prefill worker %s failed on %s; retrying on another", prefill.address, rid
                        )
                        continue  # the reservation stays: the next prefill worker rewrites every block
                await asyncio.shield(self._release(decode, rid, writer_done))
                raise from_grpc(e, "prefill") from e
            except BaseException:  # cancelled (client gone) or anything unexpected
                prefill.settle()
                writer_done = await asyncio.shield(self._abort_prefill(prefill, rid))
                await asyncio.shield(self._release(decode, rid, writer_done))
                raise
        stream = GenerationStream(
            rid, len(prompt), started, worker=decode, pool=self.pool, options=self.options
        )
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
        if response.HasField("first_logprob"):
            generate.first_logprob.CopyFrom(response.first_logprob)
        stream.call = decode.decode.Generate(generate)
        return stream

    async def _reserve(
        self, rid: str, prompt: list[int], sampling: pb.SamplingParams
    ) -> tuple[Worker, pb.KvDestination]:
        """A decode reservation; waits (up to admission_timeout_s) while every decode worker is full."""
        deadline = time.monotonic() + self.options.admission_timeout_s
        backoff = 0.01
        while True:
            full: set[str] = set()
            while True:
                try:
                    decode = await self.pool.pick_live("decode", exclude=full, prompt=prompt)
                except APIError:
                    break
                request = pb.ReserveRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling)
                try:
                    reply = await decode.decode.Reserve(request, timeout=self.options.reserve_timeout_s)
                    return decode, reply.destination
                except grpc.aio.AioRpcError as e:
                    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        full.add(decode.address)
                        continue
                    # the worker may have reserved before the call failed (deadline): hold nothing for us
                    await self._release(decode, rid, writer_done=True)
                    if e.code() == grpc.StatusCode.UNAVAILABLE:
                        self.pool.mark_down(decode, e.details() or "unavailable")
                    else:
                        raise from_grpc(e, "decode") from e
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
        await _quietly(
            decode.decode.Release(pb.ReleaseRequest(request_id=rid, writer_done=writer_done), timeout=5)
        )
