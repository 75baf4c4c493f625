"""The Worker service every role serves: what the worker is (GetInfo) and how loaded it is (GetLoad, WatchLoad)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from pathlib import Path

import grpc
from pdmesh.v1 import worker_pb2 as pb
from pdmesh.v1 import worker_pb2_grpc as pb_grpc

from services.engine.engine import Engine
from services.transfer.endpoints import KvEndpoint
from services.worker.convert import endpoints_to_proto

MIN_WATCH_INTERVAL_S = 0.05


def load_of(engine: Engine, transferred_bytes: int = 0) -> pb.Load:
    return pb.Load(**asdict(engine.load_counts()), transferred_bytes=transferred_bytes)


class WorkerService(pb_grpc.WorkerServicer):
    def __init__(
        self,
        engine: Engine,
        endpoints: tuple[KvEndpoint, ...] = (),
        host_id: str = "",
        transferred: Callable[[], int] = lambda: 0,
    ) -> None:
        self.engine = engine
        self.endpoints = endpoints
        self.host_id = host_id
        self.transferred = transferred

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
        while True:
            yield load_of(self.engine, self.transferred())
            await asyncio.sleep(interval)
