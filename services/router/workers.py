"""The router's view of its workers: membership, channels, what each serves, health, load, KV cache, breakers.

Membership comes from discovery sources (services/router/discovery.py: static lists, DNS, the Kubernetes API),
each publishing the addresses it knows per role; the pool serves their union, connecting to a worker that joins
and dropping one that leaves (its channel closes once its calls have ended). A joining worker is checked before
it is used: the role it reports, the mode of the fleet (prefill/decode or colocated) and its KV layout must match.

Every worker's load is followed (`WatchLoad`, a report every `load_interval_s`); a worker whose stream breaks or
goes silent is marked down and skipped until a new subscription delivers again. A worker that reports its load
but fails requests is cut off by its circuit breaker (services/router/breaker.py). Every worker's prefix cache is
followed (`WatchKvEvents`) into one exact index. No router-to-router protocol: every replica subscribes itself.
Picking is the configured policy over the usable workers of a role (services/router/policies.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
from pdmesh.v1 import worker_pb2 as pb
from pdmesh.v1 import worker_pb2_grpc as pb_grpc

from services.common.block_hash import prefix_hashes
from services.common.grpc_options import GRPC_OPTIONS
from services.router.breaker import Breaker
from services.router.errors import APIError
from services.router.kv_index import KvIndex, follow
from services.router.policies import Chooser

log = logging.getLogger("pdmesh.router")
ROLES = ("prefill", "decode", "colocated")
MODE_ROLES = {"pd": ("prefill", "decode"), "colocated": ("colocated",)}
CLOSE_GRACE_S = 3600.0  # a departed worker's channel closes when its last call ends (or after this)
RESUBSCRIBE_S = (0.2, 0.5, 1.0, 2.0)  # after the nth failure in a row

Members = dict[str, set[str]]  # role -> addresses


@dataclass
class Worker:
    address: str
    role: str
    info: pb.WorkerInfo | None = None
    load: pb.Load | None = None
    healthy: bool = False
    last_error: str = "not contacted yet"
    refused: str = ""  # why this worker may not serve here (wrong role, mode or KV layout); fixed once set
    channel: grpc.aio.Channel | None = None
    breaker: Breaker = field(default_factory=Breaker)
    # dispatched by this replica, not yet in a load report and not yet done: (when, tokens of work)
    unreported: list[tuple[float, int]] = field(default_factory=list)
    follower: asyncio.Task[None] | None = None  # KV events
    watcher: asyncio.Task[None] | None = None  # load

    @property
    def usable(self) -> bool:
        return self.healthy and not self.refused and self.breaker.allows()

    def settle(self) -> None:
        """This replica's oldest dispatch to the worker has done its queued work (prefill: the first token)."""
        if self.unreported:
            self.unreported.pop(0)

    def connect(self) -> None:
        """Open the channel; must run inside the event loop that will use it."""
        self.channel = grpc.aio.insecure_channel(self.address, options=GRPC_OPTIONS)
        self.worker = pb_grpc.WorkerStub(self.channel)
        self.prefill = pb_grpc.PrefillStub(self.channel)
        self.decode = pb_grpc.DecodeStub(self.channel)
        self.colocated = pb_grpc.ColocatedStub(self.channel)


Selected = Callable[["Worker", int, int], None]  # (worker, prompt tokens, of which cached there)
BreakerChange = Callable[["Worker", str], None]  # (worker, "opened" | "closed")


@dataclass
class WorkerPool:
    load_interval_s: float = 0.25
    poll_timeout_s: float = 2.0
    policy: str = "kv_aware"
    on_select: Selected | None = None
    on_breaker: BreakerChange | None = None
    breaker_threshold: int = 3
    breaker_cooldown_s: float = 5.0
    index: KvIndex = field(default_factory=KvIndex)
    _by_address: dict[str, Worker] = field(default_factory=dict)
    _sources: dict[str, Members] = field(default_factory=dict)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _started: bool = False

    def __post_init__(self) -> None:
        self.chooser = Chooser(self.policy)
        self._hashed: tuple[list[int] | None, int, list[int]] = (None, 0, [])  # the last prompt hashed
        self.mode: str | None = None  # fixed by the first worker to join: "pd" or "colocated"
        self.layout: str | None = None  # the KV layout of the fleet's prefill and decode workers
        self.became_ready = False

    @property
    def workers(self) -> list[Worker]:
        return list(self._by_address.values())

    def of_role(self, role: str) -> list[Worker]:
        return [w for w in self._by_address.values() if w.role == role]

    # ---- membership ----------------------------------------------------------------------------------------
    def set_members(self, source: str, members: Members) -> None:
        """What one discovery source knows now (a full snapshot); the pool serves the union of its sources."""
        self._sources[source] = {r: set(a) for r, a in members.items()}
        wanted: dict[str, str] = {}
        for known in self._sources.values():
            for role in ROLES:
                for address in sorted(known.get(role, ())):
                    if wanted.setdefault(address, role) != role:
                        log.error("%s is listed as both %s and %s: kept as %s", address, wanted[address], role, wanted[address])  # fmt: skip
        for address in [a for a in self._by_address if a not in wanted]:
            self._leave(self._by_address[address])
        for address, role in wanted.items():
            w = self._by_address.get(address)
            if w is not None and w.role != role:
                self._leave(w)
                w = None
            if w is None:
                self._join(Worker(address, role))

    def follow_source(self, source: str, snapshots: AsyncIterator[Members]) -> None:
        """Apply a discovery source's snapshots as they come, for as long as the pool runs."""

        async def run() -> None:
            try:
                async for members in snapshots:
                    self.set_members(source, members)
            except Exception:
                log.exception("discovery source %s failed; its workers stay as last seen", source)

        self._tasks.append(asyncio.create_task(run()))

    def _join(self, w: Worker) -> None:
        w.breaker = Breaker(self.breaker_threshold, self.breaker_cooldown_s)
        self._by_address[w.address] = w
        if self.mode is None:
            self.mode = "colocated" if w.role == "colocated" else "pd"
        elif w.role not in MODE_ROLES[self.mode]:
            other = "prefill and decode" if self.mode == "pd" else "colocated"
            w.refused = f"it is a {w.role} worker, and this router serves {other} workers"
            log.error("%s worker %s refused: %s", w.role, w.address, w.refused)
        if not self._started:
            return
        log.info("%s worker %s joined", w.role, w.address)
        w.connect()
        self._subscribe(w)

    def _subscribe(self, w: Worker) -> None:
        w.watcher = asyncio.create_task(self._watch_load(w))
        if self.policy == "kv_aware":
            w.follower = asyncio.create_task(follow(w.worker, w.address, self.index))

    def _leave(self, w: Worker) -> None:
        if self._by_address.get(w.address) is w:
            del self._by_address[w.address]
        log.info("%s worker %s left", w.role, w.address)
        w.healthy, w.last_error = False, "left the fleet"
        for task in (w.follower, w.watcher):
            if task is not None:
                task.cancel()
        self.index.drop(w.address)
        if w.channel is not None:
            # NOTE: calls in flight (a stream being decoded) finish on the open channel; nothing new is sent
            self._tasks.append(asyncio.create_task(w.channel.close(grace=CLOSE_GRACE_S)))

    # ---- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._started = True
        for w in self.workers:
            w.connect()
        await self.poll()
        for w in self.workers:
            self._subscribe(w)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for w in self.workers:
            for task in (w.follower, w.watcher):
                if task is not None:
                    task.cancel()
            if w.channel is not None:
                await w.channel.close()

    async def wait_ready(self, timeout_s: float) -> None:
        """Until every role has a usable worker; raises TimeoutError naming those that never answered, and
        ValueError when the first workers disagree on their KV layout."""
        deadline = time.monotonic() + timeout_s
        while not self.ready:
            # a statically listed fleet that disagrees is a configuration error; a discovered joiner is only refused
            static = set().union(*self._sources.get("static", {}).values())
            if any(w.refused and w.address in static for w in self.workers):
                detail = "; ".join(
                    f"{w.role} worker {w.address}: {w.refused}" for w in self.workers if w.refused
                )
                raise ValueError(f"workers refused: {detail}.")
            if time.monotonic() > deadline:
                down = ", ".join(
                    f"{w.role} {w.address} ({w.last_error or w.refused})"
                    for w in self.workers
                    if not w.usable
                )
                raise TimeoutError(f"workers not reachable after {timeout_s:.0f}s: {down or 'none found'}")
            await asyncio.sleep(0.2)
            await self.poll()
        self.became_ready = True

    @property
    def roles(self) -> tuple[str, ...]:
        return MODE_ROLES[self.mode] if self.mode is not None else ()

    @property
    def ready(self) -> bool:
        return bool(self.roles) and all(any(w.usable for w in self.of_role(r)) for r in self.roles)

    # ---- picking -------------------------------------------------------------------------------------------
    def pick(
        self,
        role: str,
        exclude: set[str] | frozenset[str] = frozenset(),
        prompt: list[int] | None = None,
        prefer: str | None = None,
    ) -> Worker:
        """A worker of `role` by the policy; `prefer`: this address whenever it is usable (the samples of one
        request follow the first one's workers, whose cache holds their prompt)."""
        candidates = [w for w in self.of_role(role) if w.usable and w.address not in exclude]
        if not candidates:
            tripped = [
                w for w in self.of_role(role) if w.healthy and not w.refused and not w.breaker.allows()
            ]
            why = (
                f" ({len(tripped)} cut off by their circuit breakers after failing requests)"
                if tripped
                else ""
            )
            raise APIError(503, f"no healthy {role} worker is available{why}; check the workers and retry.")
        prompt = prompt or []

        def cached_blocks() -> dict[str, int]:
            block = next((w.info.block_size for w in candidates if w.info is not None), 0)
            if not block:
                return {}
            # NOTE: a PD request picks twice (decode, then prefill) with the same prompt: hash it once
            if self._hashed[0] is not prompt or self._hashed[1] != block:
                # the engine reuses cached blocks for all but the last prompt token (its logits must be computed)
                self._hashed = (prompt, block, prefix_hashes(prompt, block, len(prompt) - 1))
            return self.index.matched_blocks(self._hashed[2])

        preferred = next((w for w in candidates if w.address == prefer), None)
        if preferred is not None:
            worker, cached = preferred, cached_blocks().get(preferred.address, 0)
        else:
            worker, cached = self.chooser.choose(role, candidates, len(prompt), cached_blocks)
        block = worker.info.block_size if worker.info is not None else 0
        worker.unreported.append((time.monotonic(), max(1, len(prompt) - cached * block)))
        worker.breaker.take()
        if self.on_select is not None:
            self.on_select(worker, len(prompt), cached * block)
        return worker

    async def pick_live(
        self,
        role: str,
        exclude: set[str] | frozenset[str] = frozenset(),
        prompt: list[int] | None = None,
        prefer: str | None = None,
    ) -> Worker:
        """Like pick, but when none looks healthy, poll once more first (a worker may have just come up)."""
        try:
            return self.pick(role, exclude, prompt, prefer)
        except APIError:
            await self.poll()
            return self.pick(role, exclude, prompt, prefer)

    # ---- outcomes ------------------------------------------------------------------------------------------
    def succeeded(self, worker: Worker) -> None:
        if worker.breaker.failures >= worker.breaker.threshold:
            log.info("%s worker %s: circuit breaker closed", worker.role, worker.address)
            if self.on_breaker is not None:
                self.on_breaker(worker, "closed")
        worker.breaker.success()

    def failed(self, worker: Worker, error: str, down: bool = False) -> None:
        """A call to the worker failed by the worker's fault; `down`: it is unreachable (skip it until polled)."""
        if down:
            self.mark_down(worker, error)
        if worker.breaker.failure():
            log.warning(
                "%s worker %s: circuit breaker open for %.0fs after %d failures in a row (last: %s)",
                worker.role, worker.address, worker.breaker.cooldown, worker.breaker.failures, error,
            )  # fmt: skip
            if self.on_breaker is not None:
                self.on_breaker(worker, "opened")

    def mark_down(self, worker: Worker, error: str) -> None:
        if worker.healthy:
            log.warning("%s worker %s marked down: %s", worker.role, worker.address, error)
        worker.healthy = False
        worker.last_error = error

    # ---- polling -------------------------------------------------------------------------------------------
    async def poll(self) -> None:
        await asyncio.gather(*(self._poll_one(w) for w in self.workers if w.channel is not None))

    async def _poll_one(self, w: Worker) -> None:
        try:
            if w.info is None:
                info = await w.worker.GetInfo(pb.GetInfoRequest(), timeout=self.poll_timeout_s)
                self._check_joiner(w, info)
                w.info = info
            asked = time.monotonic()
            w.load = await w.worker.GetLoad(pb.GetLoadRequest(), timeout=self.poll_timeout_s)
            # the report includes everything dispatched before it was asked for
            w.unreported = [(t, n) for t, n in w.unreported if t >= asked]
        except grpc.aio.AioRpcError as e:
            self.mark_down(w, e.details() or str(e.code()))
            return
        self._up(w)

    def _check_joiner(self, w: Worker, info: pb.WorkerInfo) -> None:
        if w.refused:
            return
        if info.role != w.role:
            w.refused = f"it is a {info.role} worker, listed as {w.role}"
        elif w.role in ("prefill", "decode"):
            if self.layout is None:
                self.layout = info.layout_fingerprint
            elif info.layout_fingerprint != self.layout:
                w.refused = (
                    f"its KV layout ({info.layout_fingerprint}) differs from the fleet's ({self.layout}); "
                    "prefill and decode workers must serve one model with one layout"
                )
        if w.refused:
            log.error("%s worker %s refused: %s", w.role, w.address, w.refused)

    async def _watch_load(self, w: Worker) -> None:
        """Follow the worker's load reports for as long as it is in the fleet; it is down while they do not come."""
        failures = 0
        while True:
            if w.info is None:
                await self._poll_one(w)  # what it is (GetInfo), before its reports are used
            if w.info is not None:
                call = w.worker.WatchLoad(pb.WatchLoadRequest(interval_s=self.load_interval_s))
                previous = time.monotonic()
                try:
                    while True:
                        # a stalled worker keeps its connection but sends nothing: silence is a failure too
                        async with asyncio.timeout(self.poll_timeout_s + 2 * self.load_interval_s):
                            load = await call.read()
                        if load is grpc.aio.EOF:
                            raise ConnectionError("the load stream ended")
                        received = time.monotonic()
                        w.load = load
                        # NOTE: what was dispatched before the previous report arrived is in this one (the worker
                        # made it at least an interval later)
                        w.unreported = [(t, n) for t, n in w.unreported if t >= previous]
                        previous = received
                        failures = 0
                        self._up(w)
                except grpc.aio.AioRpcError as e:
                    self.mark_down(w, e.details() or str(e.code()))
                except TimeoutError:
                    self.mark_down(
                        w, f"no load report for {self.poll_timeout_s + 2 * self.load_interval_s:.1f}s"
                    )
                except ConnectionError as e:
                    self.mark_down(w, str(e))
                finally:
                    call.cancel()
            await asyncio.sleep(RESUBSCRIBE_S[min(failures, len(RESUBSCRIBE_S) - 1)])
            failures += 1

    def _up(self, w: Worker) -> None:
        if w.address not in self._by_address:
            return  # left meanwhile
        if not w.healthy and not w.refused:
            log.info("%s worker %s is up", w.role, w.address)
        w.healthy, w.last_error = True, ""

    @property
    def max_model_len(self) -> int:
        lens = [w.info.max_model_len for w in self.workers if w.info is not None and not w.refused]
        return min(lens) if lens else 0


def static_members(addresses: dict[str, list[str]]) -> Members:
    """Check a static fleet (`--prefill/--decode/--colocated HOST:PORT` lists) and return it as members."""
    members = {role: set(addresses.get(role, ())) for role in ROLES}
    given = {r for r, a in members.items() if a}
    if "colocated" in given and given != {"colocated"}:
        raise ValueError("give either colocated workers or prefill and decode workers, not both")
    if given and given != {"colocated"} and given != {"prefill", "decode"}:
        raise ValueError("a disaggregated cluster needs at least one prefill and one decode worker")
    return members
