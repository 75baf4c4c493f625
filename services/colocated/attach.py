"""A colocated worker: prefill and decode in one engine (services/colocated/service.py)."""

from __future__ import annotations

from pdmesh.v1 import worker_pb2_grpc as pb_grpc

from services.colocated.service import ColocatedService
from services.engine.async_engine import AsyncEngine
from services.worker.server import Attached, Setup


def attach(setup: Setup) -> Attached:
    aengine = AsyncEngine(setup.engine)
    pb_grpc.add_ColocatedServicer_to_server(ColocatedService(aengine), setup.server)
    return Attached(aengine)
