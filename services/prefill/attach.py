"""A prefill worker: its engine computes prompts and pushes their KV to decode workers (services/prefill/service.py).
A tensor-parallel one has a PrefillRank on every rank (services/prefill/rank.py)."""

from __future__ import annotations

from pdmesh.v1 import worker_pb2_grpc as pb_grpc

from services.engine.async_engine import AsyncEngine
from services.engine.engine import Engine
from services.prefill.rank import MakePrefillRank, RankedSender
from services.prefill.service import PrefillService
from services.transfer.sender import KvSender
from services.worker.server import Attached, Setup, TransferOptions


def make_rank(transfer: TransferOptions, public_host: str) -> MakePrefillRank:
    return MakePrefillRank(
        transfer.protocol, transfer.device, public_host, transfer.timeout_s, transfer.staging_slots
    )


def attach(setup: Setup) -> Attached:
    engine = setup.engine
    aengine = AsyncEngine(engine)
    if isinstance(engine, Engine):
        rank = make_rank(setup.transfer, setup.public_host)(engine)
        sender: KvSender | RankedSender = rank.sender
    else:  # a rank group: every rank has its PrefillRank and pushes its own heads after its steps
        rank = engine.role
        sender = RankedSender(engine, aengine.post)
    prefill = PrefillService(aengine, sender)
    if isinstance(engine, Engine):
        aengine.after_step = prefill.after_step
    pb_grpc.add_PrefillServicer_to_server(prefill, setup.server)
    return Attached(
        aengine, rank.mooncake.endpoints, rank.mooncake.host_id, lambda: sender.bytes_sent, [rank.close]
    )
