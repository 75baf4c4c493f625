"""Thin wrappers over Mooncake's TransferEngine: one engine per transport, P2P handshake metadata, every buffer
registered once with each."""

from __future__ import annotations

import logging
import os
import threading

import torch

from services.transfer.endpoints import KvEndpoint, host_id

log = logging.getLogger("pdmesh.transfer")
MIN_WRITE_TIMEOUT_S = 5  # Mooncake's floor for MC_TRANSFER_TIMEOUT


class TransferError(RuntimeError):
    pass


def _transfer_engine_class():  # type: ignore[no-untyped-def]
    try:
        from mooncake.engine import TransferEngine
    except ImportError as e:
        raise TransferError(
            f"the Mooncake Transfer Engine is not importable ({e}); install mooncake-transfer-engine (CUDA 12), "
            "mooncake-transfer-engine-cuda13 (CUDA 13) or mooncake-transfer-engine-non-cuda (CPU), "
            "and Debian's libibverbs1 — `make run` does this."
        ) from e
    return TransferEngine


class MooncakeEngine:
    """One transport. `session_id` (host:rpc_port) is how peers address it.

    Every write is bounded: Mooncake gives up after `timeout_s` plus one second per GB (MC_TRANSFER_TIMEOUT, read
    when the engine is made, at least 5 s) and reports a failure instead of hanging on a stopped or dead peer. The
    first contact with a peer (the P2P handshake) has Mooncake's own limit of about a minute.
    """

    def __init__(self, host: str, protocol: str, device: str = "", timeout_s: float = 30.0) -> None:
        if protocol == "rdma" and not device:
            raise ValueError("the rdma protocol needs --transfer-device, the RDMA NIC to use (e.g. mlx5_0)")
        os.environ.setdefault("GLOG_minloglevel", "1")
        seconds = str(max(MIN_WRITE_TIMEOUT_S, round(timeout_s)))
        for variable in ("MC_TRANSFER_TIMEOUT", "MC_TCP_PROGRESS_TIMEOUT_SEC", "MC_TCP_STATUS_TIMEOUT_SEC"):
            os.environ[variable] = seconds
        # NOTE: Mooncake installs its transport from the environment when an engine starts: with
        # MC_INTRANODE_NVLINK set (any value) only the intra-node one, else what it discovers (RDMA NICs, or TCP).
        # It is set for exactly the nvlink_intra engine's start, so a worker can hold one engine of each kind.
        self._engine = _transfer_engine_class()()
        if protocol == "nvlink_intra":
            import mooncake.engine

            if not getattr(mooncake.engine, "SUPPORT_INTRA_NVLINK", False):
                raise TransferError(
                    "this Mooncake build has no nvlink_intra transport (it comes with "
                    "mooncake-transfer-engine-cuda13 >= 0.3.14 and the CUDA 12 build on x86_64)"
                )
            os.environ["MC_INTRANODE_NVLINK"] = "1"
        try:
            rc = self._engine.initialize(host, "P2PHANDSHAKE", protocol, device)
        finally:
            os.environ.pop("MC_INTRANODE_NVLINK", None)
        if rc != 0:
            raise TransferError(f"Mooncake could not start the {protocol} transport on {host} (code {rc}).")
        self.host = host
        self.protocol = protocol
        self.session_id = f"{host}:{self._engine.get_rpc_port()}"
        self._registered: list[int] = []
        self._lock = threading.Lock()

    def register(self, tensor: torch.Tensor) -> None:
        """Register a contiguous tensor's memory for transfers (once; it must outlive the engine's use of it)."""
        assert tensor.is_contiguous(), "only contiguous memory can be registered"
        ptr, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        rc = self._engine.register_memory(ptr, size)
        if rc != 0:
            raise TransferError(
                f"Mooncake ({self.protocol}) could not register {size} bytes at {ptr:#x} (code {rc})."
            )
        with self._lock:
            self._registered.append(ptr)

    def write(self, session_id: str, src: list[int], dst: list[int], lengths: list[int]) -> None:
        """Synchronously write src[i] -> peer's dst[i] for every descriptor: all, or an error (bounded in time)."""
        rc = self._engine.batch_transfer_sync_write(session_id, src, dst, lengths)
        if rc != 0:
            raise TransferError(
                f"{self.protocol} write to {session_id} failed or timed out (code {rc}, {len(src)} descriptors, "
                f"{sum(lengths)} bytes)"
            )

    def close(self) -> None:
        with self._lock:
            for ptr in self._registered:
                self._engine.unregister_memory(ptr)
            self._registered.clear()


class MooncakeEngines:
    """The transports a worker accepts, best first; what it advertises to peers."""

    def __init__(
        self, host: str, protocols: list[str], device: str, timeout_s: float, required: bool
    ) -> None:
        """required: fail if any protocol cannot start (an explicit --transfer-protocol); else skip it (auto)."""
        self.host_id = host_id()
        self.by_protocol: dict[str, MooncakeEngine] = {}
        for protocol in protocols:
            try:
                self.by_protocol[protocol] = MooncakeEngine(host, protocol, device, timeout_s)
            except TransferError as e:
                if required or protocol == protocols[-1]:
                    raise
                log.warning("KV transport %s is not available here (%s); going without it", protocol, e)

    @property
    def protocols(self) -> list[str]:
        return list(self.by_protocol)

    @property
    def endpoints(self) -> tuple[KvEndpoint, ...]:
        return tuple(KvEndpoint(p, e.session_id) for p, e in self.by_protocol.items())

    def register(self, tensor: torch.Tensor) -> None:
        for engine in self.by_protocol.values():
            engine.register(tensor)

    def close(self) -> None:
        for engine in self.by_protocol.values():
            engine.close()


def open_engines(
    kv: torch.Tensor, requested: str, nic: str, public_host: str, timeout_s: float
) -> MooncakeEngines:
    """A worker's Mooncake engines for `--transfer-protocol requested` with its KV pool where `kv` lives; a
    protocol that cannot serve here is a usage error (SystemExit)."""
    from services.transfer.endpoints import protocols_for

    try:
        protocols = protocols_for(requested, kv.is_cuda, nic)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return MooncakeEngines(public_host, protocols, nic, timeout_s, required=requested != "auto")
