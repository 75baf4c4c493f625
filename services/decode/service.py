"""The Decode service: reserve blocks for a prompt's KV, then stream tokens once the KV has landed.

States of a request here: RESERVED (blocks held, a prefill worker is writing) -> RUNNING (decoding) -> done.
A reservation not followed by Generate within `reservation_timeout_s` is released. Blocks a transfer may still
write are never reused early: a release without the prefill worker's confirmation (`writer_done`) keeps them in
quarantine for `quarantine_s` first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc
from pdmesh.v1 import worker_pb2 as pb
from pdmesh.v1 import worker_pb2_grpc as pb_grpc

from services.engine.async_engine import AsyncEngine, EngineFailure
from services.engine.engine import Reservation
from services.engine.errors import RequestError
from services.transfer.receiver import KvReceiver
from services.worker.convert import (
    chunk_from_output,
    destination_to_proto,
    logprob_from_proto,
    sampling_from_proto,
)

log = logging.getLogger("pdmesh.decode")


class DecodeService(pb_grpc.DecodeServicer):
    def __init__(
        self, aengine: AsyncEngine, receiver: KvReceiver, reservation_timeout_s: float, quarantine_s: float
    ) -> None:
        self.aengine = aengine
        self.engine = aengine.engine
        self.receiver = receiver
        self.reservation_timeout_s = reservation_timeout_s
        self.quarantine_s = quarantine_s
        self.reserved: dict[str, tuple[Reservation, asyncio.TimerHandle]] = {}
        self.quarantined = 0  # requests whose blocks wait out a possible late write
        self._tasks: set[asyncio.Task[None]] = set()

    async def Reserve(
        self, request: pb.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReserveResponse:
        rid = request.request_id
        try:
            params = sampling_from_proto(request.sampling)
            reservation = await self.aengine.call(
                self.engine.reserve, rid, list(request.prompt_token_ids), params
            )
        except RequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if reservation is None:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "no free KV blocks or sequence slots on this decode worker now; retry later or on another worker.",
            )
        timer = asyncio.get_running_loop().call_later(self.reservation_timeout_s, self._spawn_expiry, rid)
        self.reserved[rid] = (reservation, timer)
        return pb.ReserveResponse(destination=destination_to_proto(self.receiver.destination(reservation)))

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TokenChunk]:
        arrived = time.monotonic()
        rid = request.request_id
        entry = self.reserved.pop(rid, None)
        if entry is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no reservation for {rid} (unknown, expired or released)."
            )
        reservation, timer = entry
        timer.cancel()
        if request.HasField("kv_checksum"):
            got = await self.aengine.call(self.receiver.checksum, reservation)
            if got != request.kv_checksum:
                await self.aengine.call(self.engine.release, rid)
                await context.abort(
                    grpc.StatusCode.DATA_LOSS,
                    f"KV checksum mismatch for {rid}: sent {request.kv_checksum:#x}, received {got:#x}.",
                )
        stream = self.aengine.open_stream(rid)
        finished = False
        try:
            # admission waits for the step in flight to end: that wait is this request's first decode delay
            first = await self.aengine.call(self.engine.admit_prefilled, rid, request.first_token)
            timings = pb.Timings(first_decode_ms=(time.monotonic() - arrived) * 1e3)
            for out in first:
                if request.HasField("first_logprob"):
                    out.new_logprobs = [logprob_from_proto(request.first_logprob)]
                finished = out.finished
                yield chunk_from_output(out, timings)
            if not finished:
                async for out in self.aengine.outputs(stream):
                    finished = out.finished
                    yield chunk_from_output(out)
        except EngineFailure as e:
            await context.abort(grpc.StatusCode.INTERNAL, str(e))
        finally:
            self.aengine.close_stream(rid)
            if not finished:
                await asyncio.shield(self.aengine.call(self.engine.abort, rid))

    async def Release(
        self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseResponse:
        rid = request.request_id
        entry = self.reserved.pop(rid, None)
        if entry is None:  # decoding (or done): an abort frees its blocks, no transfer is writing any more
            return pb.ReleaseResponse(released=await self.aengine.call(self.engine.abort, rid))
        entry[1].cancel()
        if request.writer_done:
            await self._release_reserved(rid, writer_done=True)
        else:
            self._spawn(self._release_reserved(rid, writer_done=False))
        return pb.ReleaseResponse(released=True)

    def _spawn_expiry(self, rid: str) -> None:
        self._spawn(self._expire(rid))

    async def _expire(self, rid: str) -> None:
        if self.reserved.pop(rid, None) is not None:
            log.warning("reservation %s expired without Generate; releasing its blocks", rid)
            await self._release_reserved(rid, writer_done=False)

    async def _release_reserved(self, rid: str, writer_done: bool) -> None:
        if writer_done:
            await self.aengine.call(self.engine.release, rid)
            return
        # a prefill worker we could not confirm with may still be writing: keep the blocks out of use a while
        self.quarantined += 1
        try:
            await asyncio.sleep(self.quarantine_s)
            await self.aengine.call(self.engine.release, rid)
        finally:
            self.quarantined -= 1

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
