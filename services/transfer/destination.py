"""Where a prefill worker writes a request's KV on a decode worker."""

from __future__ import annotations

from dataclasses import dataclass, replace

from services.transfer.endpoints import KvEndpoint


@dataclass(frozen=True)
class RankTarget:
    """One tensor-parallel rank's KV pool on a decode worker."""

    endpoints: tuple[KvEndpoint, ...]
    host_id: str
    base_address: int


@dataclass(frozen=True)
class KvDestination:
    endpoints: tuple[KvEndpoint, ...]  # the transports the decode worker accepts
    host_id: str  # the decode worker's host
    base_address: int  # address of block 0 of its registered KV pool
    block_nbytes: int
    block_ids: tuple[int, ...]  # one per prompt block, in order
    num_cached_tokens: int  # leading tokens the decode worker already holds: not sent
    layout_fingerprint: str
    lease_address: str = (
        ""  # the decode worker's gRPC address: the prefill worker renews the reservation there
    )
    lease_s: float = 0.0  # the reservation lapses this long after the last renewal (0: no lease)
    ranks: tuple[RankTarget, ...] = ()  # a tensor-parallel decode worker's ranks (rank 0's is the above)

    def for_rank(self, rank: int) -> KvDestination:
        """Where prefill rank `rank` writes: the decode rank holding the same heads (same block ids)."""
        if not self.ranks:
            if rank:
                raise ValueError(
                    f"prefill rank {rank} has no decode rank to write to (the decode worker has one)"
                )
            return self
        if rank >= len(self.ranks):
            raise ValueError(
                f"prefill rank {rank} has no decode rank to write to ({len(self.ranks)} ranks there)"
            )
        t = self.ranks[rank]
        return replace(self, endpoints=t.endpoints, host_id=t.host_id, base_address=t.base_address, ranks=())

    def address(self, index: int) -> int:
        """Address of the index-th prompt block on the decode worker."""
        return self.base_address + self.block_ids[index] * self.block_nbytes

    def skip_blocks(self, block_size: int) -> int:
        return self.num_cached_tokens // block_size
