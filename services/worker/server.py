"""Start one worker process: the engine, the gRPC server with the Worker and health services, and the role's
service, which its package attaches (services/{prefill,decode,colocated}/attach.py; composed by the entry point,
so this module knows no role)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pdmesh.v1 import worker_pb2_grpc as pb_grpc

from services.common.grpc_options import GRPC_OPTIONS
from services.engine.async_engine import AsyncEngine
from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.engine.parallel.state import ParallelConfig
from services.transfer.endpoints import KvEndpoint
from services.worker.ranks import start_ranks
from services.worker.service import WorkerService

log = logging.getLogger("pdmesh.worker")


@dataclass(frozen=True)
class TransferOptions:
    protocol: str = "auto"
    device: str = ""
    host: str = ""  # address peers reach this worker at (Mooncake, lease renewals); default: the gRPC host
    timeout_s: float = 30.0  # each KV write's, and each wait for a staging slot
    staging_slots: int = 4
    lease_s: float = 10.0
    quarantine_s: float = 30.0

    def __post_init__(self) -> None:
        if self.lease_s <= 0:
            raise SystemExit(f"--reservation-lease must be positive (got {self.lease_s:g})")
        # NOTE: a write that started just before a lease lapsed may run for a write timeout (Mooncake's floor is
        # 5 s); blocks of a lapsed reservation stay quarantined, and only a quarantine at least that long is safe
        if self.quarantine_s < max(5.0, self.timeout_s):
            log.warning(
                "--quarantine %.1fs is shorter than a KV write may take (%.1fs): a late write could land in reused "
                "blocks; raise --quarantine",
                self.quarantine_s,
                max(5.0, self.timeout_s),
            )


def engine_config(args: argparse.Namespace, role: str, model: str) -> EngineConfig:
    return EngineConfig(
        model=model,
        role=role,
        device=args.device,
        dtype=args.dtype,
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        kv_cache_memory_gb=args.kv_cache_memory_gb,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
        seed=args.seed,
        load_format=args.load_format,
        parallel=ParallelConfig(args.tp, args.dp, args.ep),
        ep_dispatch=args.ep_dispatch,
        tbo=args.tbo,
        tbo_min_prefill_tokens=args.tbo_min_prefill_tokens,
        tbo_min_decode_seqs=args.tbo_min_decode_seqs,
    )


def transfer_options(args: argparse.Namespace) -> TransferOptions:
    return TransferOptions(
        protocol=args.transfer_protocol,
        device=args.transfer_device,
        host=args.transfer_host or args.host,
        timeout_s=args.transfer_timeout,
        lease_s=args.reservation_lease,
        quarantine_s=args.quarantine,
    )


@dataclass
class Setup:
    """What a role gets to attach itself to the worker."""

    config: EngineConfig
    engine: Any  # ServingEngine; an Engine for the roles that move KV
    server: grpc.aio.Server
    address: str  # HOST:PORT peers reach this worker's gRPC server at
    transfer: TransferOptions
    public_host: str  # the address peers reach this machine at (never a wildcard)


@dataclass
class Attached:
    """What a role attached: its engine driver, and what the Worker service reports of its KV transfers."""

    aengine: AsyncEngine
    endpoints: tuple[KvEndpoint, ...] = ()
    host_id: str = ""
    transferred: Callable[[], int] = lambda: 0
    cleanup: list[Callable[[], None]] = field(default_factory=list)  # run in order when the worker stops


Role = Callable[[Setup], Attached]


async def serve(
    config: EngineConfig,
    host: str,
    port: int,
    transfer: TransferOptions,
    role: Role,
    make_rank: Callable[[TransferOptions, str], Callable[[Engine], Any]] | None = None,
    drain_s: float = 30.0,
    address_file: str | None = None,
) -> None:
    """Run a worker: `role` (the prefill, decode or colocated package's `attach`) adds its gRPC service;
    `make_rank` (theirs too, where KV moves) gives every rank of a parallel worker what it needs for that.
    `address_file` gets HOST:PORT once the worker serves (for supervisors that start it on a free port)."""
    cleanup = []
    public_host = _routable(transfer.host)
    if config.parallel.world > 1:
        maker = make_rank(transfer, public_host) if make_rank is not None else None
        engine: Any = start_ranks(config, _free_port(), maker)
        cleanup.append(engine.close)
    else:
        engine = Engine(config)
    server = grpc.aio.server(options=GRPC_OPTIONS)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port} (in use, or not an address of this machine)")
    setup = Setup(config, engine, server, f"{public_host}:{bound}", transfer, public_host)
    attached = role(setup)
    aengine = attached.aengine
    service = WorkerService(aengine, attached.endpoints, attached.host_id, attached.transferred)
    pb_grpc.add_WorkerServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    aengine.start()
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    endpoints = attached.endpoints
    suffix = (
        f" (KV transfer {', '.join(f'{e.protocol} {e.session_id}' for e in endpoints)})" if endpoints else ""
    )
    print(f"pdmesh {config.role} worker listening on {host}:{bound}{suffix}", flush=True)
    if address_file:
        _write_atomically(address_file, setup.address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("%s worker shutting down", config.role)
    # drain: report NOT_SERVING, end the routers' watch streams, refuse new calls, let requests under way finish
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    service.draining = True
    await server.stop(grace=drain_s)
    aengine.stop()
    for fn in [*attached.cleanup, *cleanup]:
        fn()


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # a reader sees the whole address or no file


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _routable(host: str) -> str:
    """Mooncake must advertise an address peers can reach, not a wildcard."""
    if host in ("0.0.0.0", "::", ""):
        return socket.gethostbyname(socket.gethostname())
    return host
