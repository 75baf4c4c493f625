"""Decode side of KV transfer: the KV pool is registered once with every transport; a reservation becomes a
destination."""

from __future__ import annotations

import torch

from services.transfer.checksum import kv_checksum
from services.transfer.destination import KvDestination
from services.transfer.mooncake_engine import MooncakeEngines


class KvReceiver:
    def __init__(
        self, engines: MooncakeEngines, kv: torch.Tensor, block_nbytes: int, block_size: int, fingerprint: str
    ) -> None:
        self.engines = engines
        self.kv = kv
        self.block_nbytes = block_nbytes
        self.block_size = block_size
        self.fingerprint = fingerprint
        engines.register(kv)

    def destination(
        self,
        request_id: str,
        block_ids: list[int],
        num_cached_tokens: int,
        lease_address: str,
        lease_s: float,
    ) -> KvDestination:
        return KvDestination(
            endpoints=self.engines.endpoints,
            host_id=self.engines.host_id,
            base_address=self.kv.data_ptr(),
            block_nbytes=self.block_nbytes,
            block_ids=tuple(block_ids),
            num_cached_tokens=num_cached_tokens,
            layout_fingerprint=self.fingerprint,
            lease_address=lease_address,
            lease_s=lease_s,
        )

    def checksum(self, block_ids: list[int], num_cached_tokens: int) -> int:
        """Checksum of the blocks a prefill worker wrote (the uncached ones), to compare with the sender's."""
        return kv_checksum(self.kv, block_ids[num_cached_tokens // self.block_size :])

    def checksums(self, request_id: str, block_ids: list[int], num_cached_tokens: int) -> list[int]:
        """Every rank's checksum (this worker has one)."""
        return [self.checksum(block_ids, num_cached_tokens)]
