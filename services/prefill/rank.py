"""What every rank of a prefill worker holds for KV transfer: Mooncake engines, staging, and the writers that
push each step's completed blocks (`push_completed`). A worker of one rank uses them directly; a tensor-parallel
worker has a PrefillRank on every rank (services/worker/ranks.py) writing its own heads to the decode rank that
holds the same heads, and rank 0 sees them through a RankedSender: a request's transfer is over when every
rank's is.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.engine.engine import Engine, RequestOutput
from services.transfer.destination import KvDestination
from services.transfer.mooncake_engine import open_engines
from services.transfer.sender import KvSender
from services.transfer.staging import StagingBuffer


def push_completed(sender: KvSender, engine: Engine, outputs: list[RequestOutput]) -> None:
    """Engine thread, after every step: push the blocks each prompt completed; close finished prompts."""
    block_size = engine.config.block_size
    finished = {o.request_id: o for o in outputs if o.finished}
    ready: dict[str, tuple[list[int], int]] = {}
    for request_id in list(sender.requests):
        seq = engine.seqs.get(request_id)
        if seq is None:
            continue
        out = finished.get(request_id)
        if out is None:
            ready[request_id] = (seq.block_ids, seq.num_computed_tokens // block_size)
        elif out.finish_reason == "prefilled":  # the partial last block goes too
            ready[request_id] = (seq.block_ids, len(seq.block_ids))
    sender.push_ready(ready)
    for request_id in finished:
        seq = engine.seqs.get(request_id)
        if seq is not None and request_id in sender.requests:
            sender.close(request_id, seq.block_ids)


@dataclass(frozen=True)
class RankStatus:
    """One rank's transfer of one request, as reported to rank 0."""

    done: bool
    error: str | None
    bytes_sent: int
    kv_checksum: int | None
    finished: float | None
    last_progress: float = 0.0


class PrefillRank:
    def __init__(
        self, engine: Engine, protocol: str, nic: str, public_host: str, timeout_s: float, staging_slots: int
    ) -> None:
        config = engine.config
        kv, layout = engine.kv_cache.kv, engine.kv_cache.layout
        self.mooncake = open_engines(kv, protocol, nic, public_host, timeout_s)
        slot_blocks = -(-config.max_num_batched_tokens // config.block_size) + 1  # one chunk, unaligned
        staging = StagingBuffer(kv, layout.block_nbytes, staging_slots, slot_blocks)
        self.sender = KvSender(self.mooncake, kv, config.block_size, layout.block_nbytes, staging, timeout_s)
        self.tp_rank = engine.parallel.tp_rank
        self._refused: dict[str, str] = {}  # requests whose destination this rank cannot write: why

    # ---- calls from rank 0 (services/worker/ranks.py) ----------------------------------------------------
    def begin(
        self, request_id: str, destination: KvDestination, num_tokens: int, checksum: bool, lease_until: float
    ) -> None:
        try:
            self.sender.begin(
                request_id, destination.for_rank(self.tp_rank), num_tokens, checksum, lease_until
            )
        except ValueError as e:  # this request fails, not the worker
            self._refused[request_id] = f"rank {self.tp_rank}: {e}"

    def cancel(self, request_id: str) -> None:
        self.sender.cancel(request_id)

    def forget(self, request_id: str) -> None:
        self.sender.forget(request_id)
        self._refused.pop(request_id, None)

    def renewed(self, request_id: str, until: float) -> None:
        self.sender.renewed(request_id, until)

    def lapsed(self, request_id: str, why: str) -> None:
        self.sender.lapsed(request_id, why)

    def after_step(self, engine: Engine, outputs: list[RequestOutput]) -> None:
        push_completed(self.sender, engine, outputs)

    def target(self) -> None:
        return None  # nobody writes into a prefill worker

    def report(self) -> tuple[int, dict[str, RankStatus]]:
        """KV bytes this rank sent in all, and its requests' transfers."""
        statuses = {
            t.request_id: RankStatus(
                t.done.is_set(), t.error, t.bytes_sent, t.kv_checksum, t.finished, t.last_progress
            )
            for t in list(self.sender.requests.values())
        }
        for request_id, why in self._refused.items():
            statuses[request_id] = RankStatus(True, why, 0, None, None)
        return self.sender.bytes_sent, statuses

    def close(self) -> None:
        self.sender.stop()
        self.mooncake.close()


@dataclass(frozen=True)
class MakePrefillRank:
    """Builds a rank's PrefillRank in its own process (picklable)."""

    protocol: str
    nic: str
    public_host: str
    timeout_s: float
    staging_slots: int

    def __call__(self, engine: Engine) -> PrefillRank:
        return PrefillRank(
            engine, self.protocol, self.nic, self.public_host, self.timeout_s, self.staging_slots
        )


@dataclass
class RankedTransfer:
    """A request's transfer over the ranks that hold it: over when all are, failed when any failed."""

    error: str | None
    finished: float | None
    bytes_sent: int
    kv_checksum: int | None  # the first rank's
    rank_kv_checksums: list[int] = field(default_factory=list)


@dataclass
class RankedRequest:
    """What rank 0 knows of a request's transfer (the lease keeper renews its reservation while it progresses)."""

    request_id: str
    destination: KvDestination
    last_progress: float = field(default_factory=time.monotonic)


class RankedSender:
    """Rank 0's view of the KV writers of a prefill worker with several ranks, with the KvSender interface the
    Prefill service and its lease keeper use. A request lives on one data-parallel replica; its tensor-parallel
    ranks each write their own heads. Calls reach the ranks with the next exchange (the engine thread keeps
    exchanging while a transfer is awaited); a transfer is over when it is over on every rank holding it."""

    def __init__(self, group: Any, post: Callable[..., None]) -> None:
        self.group = group  # a RankGroup whose role is a PrefillRank on every rank
        self.post = post  # run a function on the engine thread (AsyncEngine.post)
        self.timeout_s = group.role.sender.timeout_s
        self.tp = group.parallel.config.tp
        self.requests: dict[str, RankedRequest] = {}
        self._lock = threading.Lock()
        self._waiting: dict[str, list[Callable[[], None]]] = {}
        self._statuses: list[dict[str, RankStatus]] = []
        self._sent: list[int] = []
        group.pending = lambda: bool(self._waiting)
        group.on_exchange = self._update

    @property
    def bytes_sent(self) -> int:
        return sum(self._sent)

    def active(self) -> list[RankedRequest]:
        return [t for t in list(self.requests.values()) if self.result(t.request_id) is None]

    # ---- engine thread -------------------------------------------------------------------------------------
    def begin(
        self, request_id: str, destination: KvDestination, num_tokens: int, checksum: bool, lease_until: float
    ) -> None:
        for rank in range(self.tp):
            destination.for_rank(rank)  # ValueError here: the request is refused before any rank starts it
        replica = self.group.seqs[request_id]  # where add_request put it
        args = (request_id, destination, num_tokens, checksum, lease_until)
        self.group.queue("role.begin", *args, replica=replica)
        self.requests[request_id] = RankedRequest(request_id, destination)

    def forget(self, request_id: str) -> None:
        self.group.queue("role.forget", request_id)
        self.requests.pop(request_id, None)

    def _update(self, reports: list[tuple[int, dict[str, RankStatus]]]) -> None:
        """After every exchange: every rank's report; wake those waiting for a transfer that is over."""
        self._sent = [sent for sent, _ in reports]
        self._statuses = [statuses for _, statuses in reports]
        for t in list(self.requests.values()):
            progress = [s[t.request_id].last_progress for s in self._statuses if t.request_id in s]
            t.last_progress = max([t.last_progress, *progress])
        with self._lock:
            over = [rid for rid in self._waiting if self.result(rid) is not None]
            callbacks = [cb for rid in over for cb in self._waiting.pop(rid)]
        for callback in callbacks:
            callback()

    # ---- any thread ----------------------------------------------------------------------------------------
    def cancel(self, request_id: str) -> None:
        self.post(self.group.queue, "role.cancel", request_id)

    def renewed(self, request_id: str, until: float) -> None:
        self.post(self.group.queue, "role.renewed", request_id, until)

    def lapsed(self, request_id: str, why: str) -> None:
        self.post(self.group.queue, "role.lapsed", request_id, why)

    def when_done(self, request_id: str, callback: Callable[[], None]) -> bool:
        """Call callback once every rank's transfer of the request is over; False for an unknown request."""
        if request_id not in self.requests:
            return False
        with self._lock:
            over = self.result(request_id) is not None
            if not over:
                self._waiting.setdefault(request_id, []).append(callback)
        if over:
            callback()
        else:
            self.post(lambda: None)  # wake the engine thread: it exchanges until the transfer is over
        return True

    def result(self, request_id: str) -> RankedTransfer | None:
        """The request's transfer, once it is over on every rank holding it; None before."""
        mine = [s[request_id] for s in self._statuses if request_id in s]
        if len(mine) < self.tp or not all(s.done for s in mine):
            return None
        error = next((s.error for s in mine if s.error), None)
        finished = max((s.finished for s in mine if s.finished is not None), default=None)
        checksums = [s.kv_checksum for s in mine if s.kv_checksum is not None]
        return RankedTransfer(
            error, finished, sum(s.bytes_sent for s in mine), mine[0].kv_checksum,
            checksums if len(checksums) == len(mine) else [],
        )  # fmt: skip
