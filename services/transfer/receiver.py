"""Decode side of KV transfer: the KV pool is registered once; a reservation becomes a destination."""

from __future__ import annotations

from services.engine.engine import Reservation
from services.engine.kv_cache import KVCache
from services.transfer.checksum import kv_checksum
from services.transfer.destination import KvDestination
from services.transfer.mooncake_engine import MooncakeEngine


class KvReceiver:
    def __init__(self, engine: MooncakeEngine, kv_cache: KVCache, fingerprint: str) -> None:
        self.engine = engine
        self.kv_cache = kv_cache
        self.fingerprint = fingerprint
        engine.register(kv_cache.kv)

    def destination(self, reservation: Reservation) -> KvDestination:
        return KvDestination(
            session_id=self.engine.session_id,
            base_address=self.kv_cache.kv.data_ptr(),
            block_nbytes=self.kv_cache.layout.block_nbytes,
            block_ids=tuple(reservation.block_ids),
            num_cached_tokens=reservation.num_cached_tokens,
            layout_fingerprint=self.fingerprint,
        )

    def checksum(self, reservation: Reservation) -> int:
        """Checksum of the blocks a prefill worker wrote (the uncached ones), to compare with the sender's."""
        skip = reservation.num_cached_tokens // self.kv_cache.layout.block_size
        return kv_checksum(self.kv_cache.kv, list(reservation.block_ids[skip:]))
