"""The router's view of its workers: channels, what each serves, health, load and KV cache, and picking one.

Every worker is polled (GetLoad) every `poll_interval_s`; a worker that fails a poll or a call is marked down and
skipped until a poll succeeds again. Every worker's prefix cache is followed (`WatchKvEvents`) into one exact
index. Picking is the configured policy over the healthy workers of a role (services/router/policies.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from pdmesh.v1 import worker_pb2 as pb
from pdmesh.v1 import worker_pb2_grpc as pb_grpc

from services.common.block_hash import prefix_hashes
from services.common.grpc_options import GRPC_OPTIONS
from services.router.errors import APIError
from services.router.kv_index import KvIndex, follow
from services.router.policies import Chooser

log = logging.getLogger("pdmesh.router")
ROLES = ("prefill", "decode", "colocated")


@dataclass
class Worker:
    address: str
    role: str
    info: pb.WorkerInfo | None = None
    load: pb.Load | None = None
    healthy: bool = False
    last_error: str = "not contacted yet"
    channel: grpc.aio.Channel | None = None
    # dispatched by this replica, not yet in a load report and not yet done: (when, tokens of work)
    unreported: list[tuple[float, int]] = field(default_factory=list)

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


@dataclass
class WorkerPool:
    workers: list[Worker]
    poll_interval_s: float = 1.0
    poll_timeout_s: float = 2.0
    policy: str = "kv_aware"
    on_select: Selected | None = None
    index: KvIndex = field(default_factory=KvIndex)
    _task: asyncio.Task[None] | None = None
    _followers: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.chooser = Chooser(self.policy)
        self._hashed: tuple[list[int] | None, int, list[int]] = (None, 0, [])  # the last prompt hashed

    @classmethod
    def from_addresses(
        cls,
        addresses: dict[str, list[str]],
        poll_interval_s: float = 1.0,
        policy: str = "kv_aware",
        on_select: Selected | None = None,
    ) -> WorkerPool:
        workers = [Worker(a, role) for role in ROLES for a in addresses.get(role, [])]
        if not workers:
            raise ValueError("no workers given: pass --prefill and --decode addresses, or --colocated ones")
        roles = {w.role for w in workers}
        if "colocated" in roles and roles != {"colocated"}:
            raise ValueError("give either colocated workers or prefill and decode workers, not both")
        if roles != {"colocated"} and roles != {"prefill", "decode"}:
            raise ValueError("a disaggregated cluster needs at least one prefill and one decode worker")
        return cls(workers, poll_interval_s, policy=policy, on_select=on_select)

    @property
    def mode(self) -> str:
        return "colocated" if self.workers[0].role == "colocated" else "pd"

    def of_role(self, role: str) -> list[Worker]:
        return [w for w in self.workers if w.role == role]

    async def start(self) -> None:
        for w in self.workers:
            w.connect()
        await self.poll()
        self._task = asyncio.create_task(self._poll_forever())
        if self.policy == "kv_aware":
            self._followers = [
                asyncio.create_task(follow(w.worker, w.address, self.index)) for w in self.workers
            ]

    async def close(self) -> None:
        for task in self._followers:
            task.cancel()
        if self._task is not None:
            self._task.cancel()
        for w in self.workers:
            if w.channel is not None:
                await w.channel.close()

    async def wait_ready(self, timeout_s: float) -> None:
        """Until every role has a healthy worker; raises TimeoutError naming those that never answered."""
        deadline = time.monotonic() + timeout_s
        while not self.ready:
            if time.monotonic() > deadline:
                down = ", ".join(
                    f"{w.role} {w.address} ({w.last_error})" for w in self.workers if not w.healthy
                )
                raise TimeoutError(f"workers not reachable after {timeout_s:.0f}s: {down}")
            await asyncio.sleep(0.2)
            await self.poll()
        self._check_layouts()

    @property
    def ready(self) -> bool:
        roles = ("colocated",) if self.mode == "colocated" else ("prefill", "decode")
        return all(any(w.healthy for w in self.of_role(r)) for r in roles)

    def pick(
        self, role: str, exclude: set[str] | frozenset[str] = frozenset(), prompt: list[int] | None = None
    ) -> Worker:
        candidates = [w for w in self.of_role(role) if w.healthy and w.address not in exclude]
        if not candidates:
            raise APIError(503, f"no healthy {role} worker is available; check the workers and retry.")
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

        worker, cached = self.chooser.choose(role, candidates, len(prompt), cached_blocks)
        block = worker.info.block_size if worker.info is not None else 0
        worker.unreported.append((time.monotonic(), max(1, len(prompt) - cached * block)))
        if self.on_select is not None:
            self.on_select(worker, len(prompt), cached * block)
        return worker

    async def pick_live(
        self, role: str, exclude: set[str] | frozenset[str] = frozenset(), prompt: list[int] | None = None
    ) -> Worker:
        """Like pick, but when none looks healthy, poll once more first (a worker may have just come up)."""
        try:
            return self.pick(role, exclude, prompt)
        except APIError:
            await self.poll()
            return self.pick(role, exclude, prompt)

    def mark_down(self, worker: Worker, error: str) -> None:
        if worker.healthy:
            log.warning("%s worker %s marked down: %s", worker.role, worker.address, error)
        worker.healthy = False
        worker.last_error = error

    async def poll(self) -> None:
        await asyncio.gather(*(self._poll_one(w) for w in self.workers))

    async def _poll_one(self, w: Worker) -> None:
        try:
            if w.info is None:
                w.info = await w.worker.GetInfo(pb.GetInfoRequest(), timeout=self.poll_timeout_s)
                if w.info.role != w.role:
                    raise ValueError(f"it is a {w.info.role} worker, configured as {w.role}")
            asked = time.monotonic()
            w.load = await w.worker.GetLoad(pb.GetLoadRequest(), timeout=self.poll_timeout_s)
            # the report includes everything dispatched before it was asked for
            w.unreported = [(t, n) for t, n in w.unreported if t >= asked]
        except (grpc.aio.AioRpcError, ValueError) as e:
            self.mark_down(w, e.details() if isinstance(e, grpc.aio.AioRpcError) else str(e))
            return
        if not w.healthy:
            log.info("%s worker %s is up", w.role, w.address)
        w.healthy, w.last_error = True, ""

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.poll()
            except Exception:  # keep polling whatever one round hit
                log.exception("worker poll failed")

    def _check_layouts(self) -> None:
        infos = {w.address: w.info for w in self.workers if w.info is not None}
        prints = {i.layout_fingerprint for i in infos.values() if i.role in ("prefill", "decode")}
        if len(prints) > 1:
            detail = "; ".join(f"{a}: {i.layout_fingerprint}" for a, i in infos.items())
            raise ValueError(
                f"prefill and decode workers disagree on the KV layout ({detail}); serve one model."
            )

    @property
    def max_model_len(self) -> int:
        lens = [w.info.max_model_len for w in self.workers if w.info is not None]
        return min(lens) if lens else 0
