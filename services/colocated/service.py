"""The Colocated service: one engine prefills and decodes, streaming tokens."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
from pdmesh.v1 import worker_pb2 as pb
from pdmesh.v1 import worker_pb2_grpc as pb_grpc

from services.common.convert import sampling_from_proto
from services.common.errors import RequestError
from services.engine.async_engine import AsyncEngine, EngineFailure
from services.worker.convert import chunk_from_output


class ColocatedService(pb_grpc.ColocatedServicer):
    def __init__(self, aengine: AsyncEngine) -> None:
        self.aengine = aengine
        self.engine = aengine.engine

    async def Generate(
        self, request: pb.ColocatedRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TokenChunk]:
        rid = request.request_id
        arrival = time.monotonic()
        stream = self.aengine.open_stream(rid)
        finished = False
        try:
            try:
                params = sampling_from_proto(request.sampling)
                await self.aengine.call(
                    self.engine.add_request, rid, list(request.prompt_token_ids), params, arrival
                )
            except RequestError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            first = True
            async for out in self.aengine.outputs(stream):
                finished = out.finished
                timings = None
                if first:
                    timings = pb.Timings(
                        queue_ms=(out.queue_s or 0.0) * 1e3, prefill_ms=(out.prefill_s or 0.0) * 1e3
                    )
                    first = False
                yield chunk_from_output(out, timings)
        except EngineFailure as e:
            await context.abort(grpc.StatusCode.INTERNAL, str(e))
        finally:
            self.aengine.close_stream(rid)
            if not finished:
                await asyncio.shield(self.aengine.call(self.engine.abort, rid))

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        return pb.AbortResponse(aborted=await self.aengine.call(self.engine.abort, request.request_id))
