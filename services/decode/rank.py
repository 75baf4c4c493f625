"""What every rank of a decode worker holds for KV transfer: its Mooncake engines and its KV pool registered with
them. A worker of one rank uses it directly; a tensor-parallel worker has one per rank (services/worker/ranks.py)
and lists every rank's pool in the destinations it hands out."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from services.engine.engine import Engine, RequestOutput
from services.transfer.destination import KvDestination, RankTarget
from services.transfer.mooncake_engine import open_engines
from services.transfer.receiver import KvReceiver


class DecodeRank:
    def __init__(self, engine: Engine, protocol: str, nic: str, public_host: str, timeout_s: float) -> None:
        kv, layout = engine.kv_cache.kv, engine.kv_cache.layout
        self.mooncake = open_engines(kv, protocol, nic, public_host, timeout_s)
        self.receiver = KvReceiver(
            self.mooncake, kv, layout.block_nbytes, engine.config.block_size, engine.layout_fingerprint
        )

    def target(self) -> RankTarget:
        return RankTarget(self.mooncake.endpoints, self.mooncake.host_id, self.receiver.kv.data_ptr())

    def checksum(self, block_ids: list[int], num_cached_tokens: int) -> int:
        return self.receiver.checksum(block_ids, num_cached_tokens)

    def after_step(self, engine: Engine, outputs: list[RequestOutput]) -> None:
        pass

    def report(self) -> None:
        return None

    def close(self) -> None:
        self.mooncake.close()


@dataclass(frozen=True)
class MakeDecodeRank:
    """Builds a rank's DecodeRank in its own process (picklable)."""

    protocol: str
    nic: str
    public_host: str
    timeout_s: float

    def __call__(self, engine: Engine) -> DecodeRank:
        return DecodeRank(engine, self.protocol, self.nic, self.public_host, self.timeout_s)


class RankedReceiver:
    """The receiver of a decode worker with several ranks, on rank 0. A request lives on one data-parallel replica
    (the one it was reserved on); its destination lists that replica's tensor-parallel ranks' pools (they
    allocate in step, so one list of block ids serves them all), and its checksums come from those ranks."""

    def __init__(self, group: Any) -> None:
        self.group = group  # a RankGroup whose role is a DecodeRank on every rank
        self.local: KvReceiver = group.role.receiver

    def destination(
        self,
        request_id: str,
        block_ids: list[int],
        num_cached_tokens: int,
        lease_address: str,
        lease_s: float,
    ) -> KvDestination:
        d = self.local.destination(request_id, block_ids, num_cached_tokens, lease_address, lease_s)
        ranks: list[RankTarget] = self.group.targets_of(self.group.seqs[request_id])
        first = ranks[0]
        return replace(
            d,
            endpoints=first.endpoints,
            host_id=first.host_id,
            base_address=first.base_address,
            ranks=tuple(ranks),
        )

    def checksums(self, request_id: str, block_ids: list[int], num_cached_tokens: int) -> list[int]:
        """Engine thread: the checksum of the blocks written on each rank holding the request, in rank order."""
        replica = self.group.seqs[request_id]
        return self.group.call_now("role.checksum", block_ids, num_cached_tokens, replica=replica)
