"""A prefill worker: its engine computes prompts and pushes their KV to decode workers (services/prefill/service.py)."""

from __future__ import annotations

from pdmesh.v1 import worker_pb2_grpc as pb_grpc

from services.engine.async_engine import AsyncEngine
from services.prefill.service import PrefillService
from services.transfer.mooncake_engine import open_engines
from services.transfer.sender import KvSender
from services.transfer.staging import StagingBuffer
from services.worker.server import Attached, Setup


def attach(setup: Setup) -> Attached:
    engine, config, transfer = setup.engine, setup.config, setup.transfer
    kv, layout = engine.kv_cache.kv, engine.kv_cache.layout
    mooncake = open_engines(kv, transfer.protocol, transfer.device, setup.public_host, transfer.timeout_s)
    slot_blocks = -(-config.max_num_batched_tokens // config.block_size) + 1  # one chunk, unaligned
    staging = StagingBuffer(kv, layout.block_nbytes, transfer.staging_slots, slot_blocks)
    sender = KvSender(mooncake, kv, config.block_size, layout.block_nbytes, staging, transfer.timeout_s)
    aengine = AsyncEngine(engine)
    prefill = PrefillService(aengine, sender)
    aengine.after_step = prefill.after_step
    pb_grpc.add_PrefillServicer_to_server(prefill, setup.server)
    return Attached(
        aengine,
        mooncake.endpoints,
        mooncake.host_id,
        lambda: sender.bytes_sent,
        [sender.stop, mooncake.close],
    )
