"""A thin wrapper over Mooncake's TransferEngine: P2P handshake metadata, one registration per buffer."""

from __future__ import annotations

import os
import threading

import torch

PROTOCOLS = ("tcp", "rdma")


class TransferError(RuntimeError):
    pass


class MooncakeEngine:
    """One engine per process. `session_id` (host:rpc_port) is how peers address this process."""

    def __init__(self, host: str, protocol: str = "tcp", device: str = "") -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown transfer protocol '{protocol}'; choose one of: {', '.join(PROTOCOLS)}")
        if protocol == "rdma" and not device:
            raise ValueError("the rdma protocol needs --transfer-device, the RDMA NIC to use (e.g. mlx5_0)")
        os.environ.setdefault("GLOG_minloglevel", "1")
        try:
            from mooncake.engine import TransferEngine
        except ImportError as e:
            raise TransferError(
                f"the Mooncake Transfer Engine is not importable ({e}); install mooncake-transfer-engine (CUDA 12), "
                "mooncake-transfer-engine-cuda13 (CUDA 13) or mooncake-transfer-engine-non-cuda (CPU), "
                "and Debian's libibverbs1 — `make run` does this."
            ) from e
        self._engine = TransferEngine()
        rc = self._engine.initialize(host, "P2PHANDSHAKE", protocol, device)
        if rc != 0:
            raise TransferError(f"Mooncake could not start on {host} with protocol {protocol} (code {rc}).")
        self.host = host
        self.protocol = protocol
        self.session_id = f"{host}:{self._engine.get_rpc_port()}"
        self._registered: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def register(self, tensor: torch.Tensor) -> None:
        """Register a contiguous tensor's memory for transfers (once; it must outlive the engine's use of it)."""
        assert tensor.is_contiguous(), "only contiguous memory can be registered"
        ptr, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        rc = self._engine.register_memory(ptr, size)
        if rc != 0:
            raise TransferError(f"Mooncake could not register {size} bytes at {ptr:#x} (code {rc}).")
        with self._lock:
            self._registered.append((ptr, size))

    def write(self, session_id: str, src: list[int], dst: list[int], lengths: list[int]) -> None:
        """Synchronously write src[i] -> peer's dst[i] for every descriptor, all or an error."""
        rc = self._engine.batch_transfer_sync_write(session_id, src, dst, lengths)
        if rc != 0:
            raise TransferError(
                f"KV write to {session_id} failed (code {rc}, {len(src)} descriptors, {sum(lengths)} bytes)."
            )

    def close(self) -> None:
        with self._lock:
            for ptr, _ in self._registered:
                self._engine.unregister_memory(ptr)
            self._registered.clear()
