"""A decode worker: reserves blocks, receives prompts' KV from prefill workers, streams tokens
(services/decode/service.py). A tensor-parallel one has a DecodeRank on every rank (services/decode/rank.py)."""

from __future__ import annotations

from pdmesh.v1 import worker_pb2_grpc as pb_grpc

from services.decode.rank import MakeDecodeRank, RankedReceiver
from services.decode.service import DecodeService
from services.engine.async_engine import AsyncEngine
from services.engine.engine import Engine
from services.transfer.receiver import KvReceiver
from services.worker.server import Attached, Setup, TransferOptions


def make_rank(transfer: TransferOptions, public_host: str) -> MakeDecodeRank:
    return MakeDecodeRank(transfer.protocol, transfer.device, public_host, transfer.timeout_s)


def attach(setup: Setup) -> Attached:
    engine, transfer = setup.engine, setup.transfer
    if isinstance(engine, Engine):
        rank = make_rank(transfer, setup.public_host)(engine)
        receiver: KvReceiver | RankedReceiver = rank.receiver
    else:  # a rank group: every rank has its DecodeRank
        rank = engine.role
        receiver = RankedReceiver(engine)
    aengine = AsyncEngine(engine)
    decode = DecodeService(aengine, receiver, setup.address, transfer.lease_s, transfer.quarantine_s)
    pb_grpc.add_DecodeServicer_to_server(decode, setup.server)
    return Attached(aengine, rank.mooncake.endpoints, rank.mooncake.host_id, cleanup=[rank.close])
