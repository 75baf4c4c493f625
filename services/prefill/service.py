"""The Prefill service: chunked prefill that pushes each chunk's KV to the decode worker while computing the next.

One `Prefill` call: check the destination's layout, confirm the decode reservation's lease, run the prompt
through the engine (prefill role), hand completed blocks to the KV writers after every step, sample the first
token, wait for the last byte to land, release the blocks, answer with the first token and timings. Any failure
or cancellation aborts the request and waits until no KV write for it is in flight, so the decode worker can free
its blocks safely. A failed transfer fails its own request only (ABORTED: the decode side is at fault, not this
worker).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from pdmesh.v1 import worker_pb2 as pb
from pdmesh.v1 import worker_pb2_grpc as pb_grpc

from services.common.convert import logprob_to_proto, sampling_from_proto
from services.common.errors import RequestError
from services.engine.async_engine import AsyncEngine, EngineFailure
from services.engine.engine import RequestOutput
from services.prefill.lease import LeaseKeeper, LeaseLapsed
from services.prefill.rank import RankedSender, RankedTransfer, push_completed
from services.transfer.destination import KvDestination
from services.transfer.mooncake_engine import TransferError
from services.transfer.sender import KvSender, RequestTransfer
from services.worker.convert import destination_from_proto
from services.worker.tombstones import Tombstones

log = logging.getLogger("pdmesh.prefill")
WAIT_LIMIT_S = 3600.0


class PrefillService(pb_grpc.PrefillServicer):
    def __init__(self, aengine: AsyncEngine, sender: KvSender | RankedSender) -> None:
        self.aengine = aengine
        self.engine = aengine.engine
        self.sender = sender
        self.leases = LeaseKeeper(sender, lambda: aengine.last_step_at)
        self.block_size = self.engine.config.block_size
        self._aborted = Tombstones()

    # ---- engine thread -----------------------------------------------------------------------------------
    def _start(
        self,
        request_id: str,
        prompt: list[int],
        params,
        destination: KvDestination,
        checksum: bool,
        lease_until: float,
        arrival: float,
    ) -> None:
        if request_id in self._aborted:
            raise RequestError(f"request {request_id} was aborted.")
        self.engine.add_request(request_id, prompt, params, arrival)
        try:
            self.sender.begin(request_id, destination, len(prompt), checksum, lease_until)
        except ValueError as e:
            self.engine.abort(request_id)
            raise RequestError(str(e)) from e

    def after_step(self, outputs: list[RequestOutput]) -> None:
        """Engine thread, after every step (a worker of one rank; each rank of a group does it itself)."""
        push_completed(self.sender, self.engine, outputs)

    def _forget(self, request_id: str) -> None:
        self.engine.release(request_id)
        self.sender.forget(request_id)

    # ---- RPCs --------------------------------------------------------------------------------------------
    async def Prefill(
        self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> pb.PrefillResponse:
        rid = request.request_id
        arrival = time.monotonic()
        try:
            params = sampling_from_proto(request.sampling)
        except RequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        destination = destination_from_proto(request.destination)
        mine = self.engine.layout_fingerprint
        if destination.layout_fingerprint != mine:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"KV layouts differ (decode {destination.layout_fingerprint}, prefill {mine}): run prefill and "
                "decode workers with the same checkpoint, dtype and block size.",
            )
        try:
            lease_until = await self.leases.confirm(rid, destination)
        except LeaseLapsed as e:
            await context.abort(grpc.StatusCode.ABORTED, str(e))
        stream = self.aengine.open_stream(rid)
        done = False
        try:
            try:
                await self.aengine.call(
                    self._start,
                    rid,
                    list(request.prompt_token_ids),
                    params,
                    destination,
                    request.kv_checksum,
                    lease_until,
                    arrival,
                )
            except RequestError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            item = await stream.get()
            if isinstance(item, BaseException):
                raise item
            out: RequestOutput = item
            try:
                transfer = await self._landed(rid)
            except TransferError as e:
                await context.abort(grpc.StatusCode.ABORTED, f"KV transfer to the decode worker failed: {e}")
            # NOTE: not awaited: the answer need not wait for the engine thread to end the step it is running
            self.aengine.post(self._forget, rid)
            done = True
            landed = transfer.finished or time.monotonic()
            response = pb.PrefillResponse(
                first_token=out.new_token_ids[0],
                text=out.new_text,
                finish_reason="" if out.finish_reason == "prefilled" else out.finish_reason or "",
                stop_reason="" if out.stop_reason is None else str(out.stop_reason),
                cached_tokens=out.num_cached_tokens,
                timings=pb.Timings(
                    queue_ms=(out.queue_s or 0.0) * 1e3,
                    prefill_ms=(out.prefill_s or 0.0) * 1e3,
                    transfer_ms=max(0.0, landed - out.emitted) * 1e3,  # not hidden behind compute
                ),
                transferred_bytes=transfer.bytes_sent,
            )
            if transfer.kv_checksum is not None:
                response.kv_checksum = transfer.kv_checksum
                response.rank_kv_checksums.extend(getattr(transfer, "rank_kv_checksums", ()))
            if out.new_logprobs:
                response.first_logprob.CopyFrom(logprob_to_proto(out.new_logprobs[0]))
            return response
        except EngineFailure as e:
            await context.abort(grpc.StatusCode.INTERNAL, str(e))
        finally:
            self.aengine.close_stream(rid)
            if not done:
                await asyncio.shield(self._abort(rid))

    async def _transfer_over(self, request_id: str, timeout: float) -> bool:
        """Wait (without a thread) until the request's transfer is over; False on timeout."""
        loop = asyncio.get_running_loop()
        over = loop.create_future()

        def notify() -> None:
            loop.call_soon_threadsafe(lambda: over.done() or over.set_result(None))

        if not self.sender.when_done(request_id, notify):
            return True
        try:
            await asyncio.wait_for(over, timeout)
            return True
        except TimeoutError:
            return False

    async def _landed(self, request_id: str) -> RequestTransfer | RankedTransfer:
        """Every byte written; raises TransferError (the request alone failed)."""
        # every write is bounded in time, so this returns; the limit only guards against a lost notification
        if not await self._transfer_over(request_id, WAIT_LIMIT_S):
            raise TransferError(f"the KV transfer of {request_id} did not end within {WAIT_LIMIT_S:.0f}s")
        t = self.sender.result(request_id)
        if t is None:  # an Abort overtook us
            raise TransferError(f"request {request_id} was aborted during its KV transfer")
        if t.error:
            raise TransferError(t.error)
        return t

    def _tombstone(self, request_id: str) -> None:
        self._aborted.add(request_id)
        self.engine.abort(request_id)

    async def _abort(self, request_id: str) -> bool:
        """Abort; True once no KV write for the request can still be in flight."""
        await self.aengine.call(self._tombstone, request_id)
        self.sender.cancel(request_id)
        drained = await self._transfer_over(request_id, self.sender.timeout_s)
        await self.aengine.call(self.sender.forget, request_id)
        return drained

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        return pb.AbortResponse(aborted=await self._abort(request.request_id))
