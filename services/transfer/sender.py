"""Prefill side of KV transfer: after each engine step, hand the blocks that became complete to their peer's writer.

Contract, per request: `begin` with its destination (picks the transport); `push_ready` after every engine step
(engine thread) queues the newly complete blocks as one job for the destination's writer and returns at once;
`close` once the prompt is done; `wait` returns when every byte has landed (or raises). The engine thread never
blocks on a transfer: staging slots, gathers and network writes happen on one writer thread per destination
session, so the transfer of chunk k overlaps the compute of chunk k+1 and a slow or dead peer holds up only the
requests bound for it. Every write has a timeout; a failed job fails its own request alone. `cancel` stops further
pushes and waits until no write for the request is in flight, after which the decode worker may free its blocks.
A write starts only while the request's decode reservation is leased (`renewed`), so it never lands in blocks the
decode worker has handed to another request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from services.transfer.checksum import kv_checksum
from services.transfer.destination import KvDestination
from services.transfer.endpoints import KvEndpoint, choose
from services.transfer.mooncake_engine import MooncakeEngines, TransferError
from services.transfer.peer import Job, PeerWriter
from services.transfer.staging import StagingBuffer, step_event

log = logging.getLogger("pdmesh.transfer")


@dataclass
class RequestTransfer:
    request_id: str
    destination: KvDestination
    endpoint: KvEndpoint  # the transport chosen for this pair
    num_blocks: int  # prompt blocks
    next_block: int  # first block not yet handed to the writer
    checksum: bool
    lease_until: float  # monotonic time before which a write may start (inf: no lease)
    started: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)
    finished: float | None = None
    queued: int = 0  # jobs waiting for the writer
    in_flight: int = 0  # jobs the writer has started (gather or write under way)
    bytes_sent: int = 0
    closed: bool = False
    cancelled: bool = False
    error: str | None = None
    kv_checksum: int | None = None
    done: threading.Event = field(default_factory=threading.Event)
    callbacks: list[Callable[[], None]] = field(default_factory=list)

    @property
    def stopped(self) -> bool:
        return self.cancelled or self.error is not None

    def maybe_done(self) -> None:
        """Call with the sender's lock held."""
        if self.done.is_set():
            return
        if self.in_flight == 0 and (self.stopped or (self.closed and self.queued == 0)):
            self.finished = time.monotonic()
            self.done.set()
            for callback in self.callbacks:
                callback()


class KvSender:
    def __init__(
        self,
        engines: MooncakeEngines,
        kv: torch.Tensor,
        block_size: int,
        block_nbytes: int,
        staging: StagingBuffer,
        timeout_s: float,
    ) -> None:
        self.engines = engines
        self.kv = kv
        self.staging = staging
        self.timeout_s = timeout_s  # each write's, and each wait for a staging slot
        self.block_size = block_size
        self.block_nbytes = block_nbytes
        self.requests: dict[str, RequestTransfer] = {}
        self.bytes_sent = 0
        self.num_writes = 0
        self._lock = threading.Lock()
        self._writers: dict[str, PeerWriter] = {}
        engines.register(staging.buffer)

    # ---- engine thread -----------------------------------------------------------------------------------
    def begin(
        self,
        request_id: str,
        destination: KvDestination,
        num_prompt_tokens: int,
        checksum: bool,
        lease_until: float = float("inf"),
    ) -> None:
        """lease_until: monotonic time until which the decode worker confirmed the reservation. Raises ValueError
        for a destination this worker cannot write."""
        num_blocks = -(-num_prompt_tokens // self.block_size)
        if len(destination.block_ids) != num_blocks:
            raise ValueError(
                f"the destination has {len(destination.block_ids)} blocks for a {num_prompt_tokens}-token prompt "
                f"that needs {num_blocks}"
            )
        endpoint = choose(
            self.engines.protocols, self.engines.host_id, list(destination.endpoints), destination.host_id
        )
        skip = destination.skip_blocks(self.block_size)
        self.requests[request_id] = RequestTransfer(
            request_id, destination, endpoint, num_blocks, skip, checksum, lease_until
        )

    def push_ready(self, ready: dict[str, tuple[list[int], int]]) -> None:
        """ready: request id -> (its source block ids, how many leading prompt blocks are complete now)."""
        after = None
        for rid, (src_blocks, complete) in ready.items():
            t = self.requests.get(rid)
            if t is None or t.stopped or t.closed:
                continue
            upto = min(complete, t.num_blocks)
            if upto <= t.next_block:
                continue
            after = after or step_event(self.kv)
            for start in range(t.next_block, upto, self.staging.slot_blocks):
                end = min(start + self.staging.slot_blocks, upto)
                dst = [t.destination.address(i) for i in range(start, end)]
                self._enqueue(t, Job(t.request_id, src_blocks[start:end], dst, after))
            t.next_block = upto
            t.last_progress = time.monotonic()

    def close(self, request_id: str, src_blocks: list[int]) -> None:
        """The prompt is complete and every block was handed over; compute the checksum if asked."""
        t = self.requests.get(request_id)
        if t is None:
            return
        if t.checksum:
            t.kv_checksum = kv_checksum(self.kv, src_blocks[t.destination.skip_blocks(self.block_size) :])
        with self._lock:
            t.closed = True
            t.maybe_done()

    def _enqueue(self, t: RequestTransfer, job: Job) -> None:
        session = t.endpoint.session_id
        writer = self._writers.get(session)
        if writer is None:
            engine = self.engines.by_protocol[t.endpoint.protocol]
            writer = PeerWriter(session, engine, self.staging, self.timeout_s, self._start_job, self._end_job)
            self._writers[session] = writer
            # once per decode peer: which transport the pair uses is what an operator checks first
            print(f"KV writes to {session} go over {t.endpoint.protocol}", flush=True)
        with self._lock:
            t.queued += 1
        writer.submit(job)

    # ---- writer threads ----------------------------------------------------------------------------------
    def _start_job(self, job: Job) -> bool:
        """Whether the writer may run the job now (False: drop it). Marks it in flight."""
        with self._lock:
            t = self.requests.get(job.request_id)
            if t is None:
                return False
            t.queued -= 1
            if not t.stopped and time.monotonic() >= t.lease_until:
                t.error = (
                    f"the decode worker's reservation for {t.request_id} lapsed before its KV was written "
                    "(the lease was not renewed in time)"
                )
            if t.stopped:
                t.maybe_done()
                return False
            t.in_flight += 1
            return True

    def _end_job(self, job: Job, nbytes: int, error: str | None) -> None:
        with self._lock:
            self.num_writes += 1
            t = self.requests.get(job.request_id)
            if t is None:
                return
            t.in_flight -= 1
            if error:
                t.error = t.error or error
            else:
                t.bytes_sent += nbytes
                self.bytes_sent += nbytes
                t.last_progress = time.monotonic()
            t.maybe_done()

    # ---- any thread --------------------------------------------------------------------------------------
    def renewed(self, request_id: str, until: float) -> None:
        """The decode worker confirmed the reservation until `until` (monotonic, counted from the renewal's send)."""
        t = self.requests.get(request_id)
        if t is not None and t.destination.lease_s > 0:
            t.lease_until = max(t.lease_until, until)

    def lapsed(self, request_id: str, why: str) -> None:
        """The decode worker no longer holds the reservation: write nothing more for the request."""
        t = self.requests.get(request_id)
        if t is None:
            return
        with self._lock:
            if not t.done.is_set():  # a transfer that completed stays completed
                t.error = t.error or why
                t.maybe_done()

    def wait(self, request_id: str, timeout: float) -> RequestTransfer:
        """Block until the request's KV has fully landed; raises TransferError / TimeoutError."""
        t = self.requests[request_id]
        if not t.done.wait(timeout):
            raise TimeoutError(f"the KV transfer of {request_id} did not finish within {timeout:.0f}s")
        if t.error:
            raise TransferError(t.error)
        return t

    def when_done(self, request_id: str, callback: Callable[[], None]) -> bool:
        """Call callback (on some thread) once the request's transfer is over; False for an unknown request."""
        t = self.requests.get(request_id)
        if t is None:
            return False
        with self._lock:
            if t.done.is_set():
                callback()
            else:
                t.callbacks.append(callback)
        return True

    def cancel(self, request_id: str) -> RequestTransfer | None:
        """Stop pushing. Once the result's `done` is set, no write for the request is in flight."""
        t = self.requests.get(request_id)
        if t is None:
            return None
        with self._lock:
            t.cancelled = True
            t.maybe_done()
        return t

    def forget(self, request_id: str) -> None:
        with self._lock:
            self.requests.pop(request_id, None)

    def result(self, request_id: str) -> RequestTransfer | None:
        """The request's transfer (its outcome once `when_done` called back)."""
        return self.requests.get(request_id)

    def active(self) -> list[RequestTransfer]:
        return [t for t in list(self.requests.values()) if not t.stopped and t.finished is None]

    def stop(self) -> None:
        for writer in list(self._writers.values()):
            writer.stop()
