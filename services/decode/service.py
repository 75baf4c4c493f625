"""The Decode service: reserve blocks for a prompt's KV, then stream tokens once the KV has landed.

States of a request here: RESERVED (blocks held, a prefill worker is writing) -> RUNNING (decoding) -> done.
A reservation is a lease: it lapses `lease_s` after it was made or last renewed (`Renew`, sent by the prefill
worker while it makes progress) unless `Generate` took it first. Blocks a transfer may still write are never reused
early: a release without the prefill worker's confirmation (`writer_done`), and a lapse, keep them in quarantine
for `quarantine_s` first (at least a write's timeout on the prefill side). A reservation whose caller is gone
before it got the answer is undone at once; a `Release` that overtakes its `Reserve` leaves a tombstone that
undoes the late reservation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass

import grpc
from pdmesh.v1 import worker_pb2 as pb
from pdmesh.v1 import worker_pb2_grpc as pb_grpc

from services.common.convert import logprob_from_proto, sampling_from_proto
from services.common.errors import RequestError
from services.decode.rank import RankedReceiver
from services.engine.async_engine import AsyncEngine, EngineFailure
from services.engine.engine import Reservation
from services.transfer.receiver import KvReceiver
from services.worker.convert import chunk_from_output, destination_to_proto
from services.worker.tombstones import Tombstones

log = logging.getLogger("pdmesh.decode")


@dataclass
class Held:
    reservation: Reservation
    expires: float  # monotonic


class DecodeService(pb_grpc.DecodeServicer):
    def __init__(
        self,
        aengine: AsyncEngine,
        receiver: KvReceiver | RankedReceiver,
        address: str,
        lease_s: float,
        quarantine_s: float,
    ) -> None:
        self.aengine = aengine
        self.engine = aengine.engine
        self.receiver = receiver
        self.address = address  # where prefill workers renew leases
        self.lease_s = lease_s
        self.quarantine_s = quarantine_s
        self.reserved: dict[str, Held] = {}
        self.quarantined = 0  # requests whose blocks wait out a possible late write
        self._released = Tombstones()  # ids released before they were reserved
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    async def Reserve(
        self, request: pb.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReserveResponse:
        rid = request.request_id
        if rid in self._released:
            await context.abort(
                grpc.StatusCode.ABORTED, f"request {rid} was released before it was reserved."
            )
        try:
            params = sampling_from_proto(request.sampling)
        except RequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        call = asyncio.ensure_future(
            self.aengine.call(self.engine.reserve, rid, list(request.prompt_token_ids), params)
        )
        try:
            reservation = await asyncio.shield(call)
        except asyncio.CancelledError:  # the caller is gone (cancelled, deadline): hold nothing for it
            self._spawn(self._undo(call, rid))
            raise
        except RequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if reservation is None:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "no free KV blocks or sequence slots on this decode worker now; retry later or on another worker.",
            )
        if rid in self._released:  # released while the engine was reserving
            await self.aengine.call(self.engine.release, rid)
            await context.abort(grpc.StatusCode.ABORTED, f"request {rid} was released while it was reserved.")
        self.reserved[rid] = Held(reservation, time.monotonic() + self.lease_s)
        self._ensure_sweeper()
        context.add_done_callback(lambda ctx: self._caller_gone(rid) if ctx.cancelled() else None)
        destination = self.receiver.destination(
            rid, reservation.block_ids, reservation.num_cached_tokens, self.address, self.lease_s
        )
        return pb.ReserveResponse(destination=destination_to_proto(destination))

    async def Renew(self, request: pb.RenewRequest, context: grpc.aio.ServicerContext) -> pb.RenewResponse:
        expires = time.monotonic() + self.lease_s
        held = []
        for rid in request.request_ids:
            entry = self.reserved.get(rid)
            if entry is not None:
                entry.expires = expires
                held.append(rid)
        return pb.RenewResponse(held=held)

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TokenChunk]:
        arrived = time.monotonic()
        rid = request.request_id
        entry = self.reserved.pop(rid, None)
        if entry is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no reservation for {rid} (unknown, lapsed or released)."
            )
        reservation = entry.reservation
        if request.HasField("kv_checksum"):
            sent = list(request.rank_kv_checksums) or [request.kv_checksum]
            got = await self.aengine.call(
                self.receiver.checksums, rid, reservation.block_ids, reservation.num_cached_tokens
            )
            if got != sent:
                await self.aengine.call(self.engine.release, rid)
                bad = [r for r in range(max(len(sent), len(got))) if sent[r : r + 1] != got[r : r + 1]]
                await context.abort(
                    grpc.StatusCode.DATA_LOSS,
                    f"KV checksum mismatch for {rid} on rank(s) {bad}: sent "
                    f"{', '.join(f'{c:#x}' for c in sent)}, received {', '.join(f'{c:#x}' for c in got)}.",
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
        if entry is None:  # decoding, done, or not reserved yet
            released = await self.aengine.call(self.engine.abort, rid)
            if not released:
                self._released.add(rid)
            return pb.ReleaseResponse(released=released)
        if request.writer_done:
            await self._release_reserved(rid, writer_done=True)
        else:
            self._spawn(self._release_reserved(rid, writer_done=False))
        return pb.ReleaseResponse(released=True)

    # ---- internals ---------------------------------------------------------------------------------------
    def _caller_gone(self, rid: str) -> None:
        """The Reserve call was cancelled after the blocks were held: nobody got the destination."""
        if self.reserved.pop(rid, None) is not None:
            self._spawn(self._release_reserved(rid, writer_done=True))

    async def _undo(self, call: Awaitable[Reservation | None], rid: str) -> None:
        try:
            reservation = await call
        except RequestError:
            return
        if reservation is not None and rid not in self.reserved:
            await self.aengine.call(self.engine.release, rid)

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep())

    async def _sweep(self) -> None:
        period = min(0.5, self.lease_s / 4)
        while self.reserved:
            await asyncio.sleep(period)
            now = time.monotonic()
            for rid in [r for r, held in self.reserved.items() if held.expires <= now]:
                del self.reserved[rid]
                log.warning(
                    "the reservation of %s lapsed (no Generate, no renewal); releasing its blocks", rid
                )
                self._spawn(self._release_reserved(rid, writer_done=False))

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

    def _spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
