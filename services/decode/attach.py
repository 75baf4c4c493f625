"""A decode worker: reserves blocks, receives prompts' KV from prefill workers, streams tokens
(services/decode/service.py)."""

from __future__ import annotations

from pdmesh.v1 import worker_pb2_grpc as pb_grpc

from services.decode.service import DecodeService
from services.engine.async_engine import AsyncEngine
from services.transfer.mooncake_engine import open_engines
from services.transfer.receiver import KvReceiver
from services.worker.server import Attached, Setup


def attach(setup: Setup) -> Attached:
    engine, config, transfer = setup.engine, setup.config, setup.transfer
    kv, layout = engine.kv_cache.kv, engine.kv_cache.layout
    mooncake = open_engines(kv, transfer.protocol, transfer.device, setup.public_host, transfer.timeout_s)
    receiver = KvReceiver(mooncake, kv, layout.block_nbytes, config.block_size, engine.layout_fingerprint)
    aengine = AsyncEngine(engine)
    decode = DecodeService(aengine, receiver, setup.address, transfer.lease_s, transfer.quarantine_s)
    pb_grpc.add_DecodeServicer_to_server(decode, setup.server)
    return Attached(aengine, mooncake.endpoints, mooncake.host_id, cleanup=[mooncake.close])
