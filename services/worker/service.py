"""The Worker service every role serves: what the worker is (GetInfo), how loaded it is (GetLoad, WatchLoad), and
what its prefix cache holds (WatchKvEvents)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from pathlib import Path

import grpc
from pdmesh.v1 import worker_pb2 as pb
from pdmesh.v1 import worker_pb2_grpc as pb_grpc

from services.engine.async_engine import AsyncEngine
from services.engine.interface import ServingEngine
from services.transfer.endpoints import KvEndpoint
from services.worker.convert import endpoints_to_proto

MIN_WATCH_INTERVAL_S = 0.05
KV_EVENTS_INTERVAL_S = 0.05


def load_of(engine: ServingEngine, transferred_bytes: int = 0) -> pb.Load:
    load = pb.Load(**asdict(engine.load_counts()), transferred_bytes=transferred_bytes)
    replicas = engine.replica_loads()
    if len(replicas) > 1:
        load.replicas.extend(
            pb.ReplicaLoad(
                running=r.running,
                waiting=r.waiting,
                used_blocks=r.used_blocks,
                total_blocks=r.total_blocks,
                pending_tokens=r.pending_tokens,
                computed_tokens=r.computed_tokens,
            )
            for r in replicas
        )
    return load


class WorkerService(pb_grpc.WorkerServicer):
    def __init__(
        self,
        aengine: AsyncEngine,
        endpoints: tuple[KvEndpoint, ...] = (),
        host_id: str = "",
        transferred: Callable[[], int] = lambda: 0,
    ) -> None:
        self.aengine = aengine
        self.engine = aengine.engine
        self.instance = uuid.uuid4().hex  # a restarted worker is a new instance with an empty cache
        self.endpoints = endpoints
        self.host_id = host_id
        self.transferred = transferred
        self.draining = (
            False  # set when the worker stops: the watch streams end, so draining waits for requests only
        )

    def info(self) -> pb.WorkerInfo:
        e = self.engine
        return pb.WorkerInfo(
            model=Path(e.config.model).name,
            role=e.config.role,
            layout_fingerprint=e.layout_fingerprint,
            num_blocks=e.runtime.num_blocks,
            block_size=e.config.block_size,
            max_model_len=e.runtime.max_model_len,
            transfer_endpoints=endpoints_to_proto(self.endpoints),
            host_id=self.host_id,
            vocab_size=e.model_config.vocab_size,
        )

    async def GetInfo(self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext) -> pb.WorkerInfo:
        return self.info()

    async def GetLoad(self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext) -> pb.Load:
        return load_of(self.engine, self.transferred())

    async def WatchLoad(
        self, request: pb.WatchLoadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Load]:
        interval = max(request.interval_s or 1.0, MIN_WATCH_INTERVAL_S)
        while not self.draining:
            yield load_of(self.engine, self.transferred())
            await asyncio.sleep(interval)

    async def WatchKvEvents(
        self, request: pb.WatchKvEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.KvEvents]:
        engine = self.engine.prefix_cache()
        if engine is None:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "data-parallel workers (--dp > 1) do not report KV events yet: each replica has its own cache",
            )
            return
        interval = max(request.interval_s or KV_EVENTS_INTERVAL_S, 0.005)
        block_size = engine.config.block_size
        seq = -1
        while not self.draining:
            events = engine.allocator.events.since(seq) if seq >= 0 else None
            if events is None:  # joining, or fell behind what the log keeps: start over from a snapshot
                seq, hashes = await self.aengine.call(engine.kv_snapshot)
                yield pb.KvEvents(
                    instance=self.instance,
                    seq=seq,
                    snapshot=True,
                    events=[pb.KvEvent(stored=True, block_hash=h) for h in hashes],
                    block_size=block_size,
                )
            elif events:
                seq = events[-1][0]
                yield pb.KvEvents(
                    instance=self.instance,
                    seq=seq,
                    events=[pb.KvEvent(stored=stored, block_hash=h) for _, stored, h in events],
                    block_size=block_size,
                )
            await asyncio.sleep(interval)
