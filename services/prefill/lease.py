"""Keep the decode reservations this prefill worker writes into alive, for as long as it makes progress on them.

A decode worker holds a reservation for `lease_s` after its last renewal. The prefill worker confirms the lease
before it starts a request, then renews the leases of the requests it is still working on every quarter lease,
one batched `Renew` per decode worker. A request makes progress while its chunks are computed or its writes land,
or while the engine steps at all (it may be queued behind others); a wedged engine or a stuck peer stops the
renewals and the lease lapses. The sender starts a write only before `lease_until`, which is counted from when the
renewal was *sent*, so the decode worker's own expiry (counted from when it arrived) is never earlier.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable

import grpc
from pdmesh.v1 import worker_pb2 as pb
from pdmesh.v1 import worker_pb2_grpc as pb_grpc

from services.transfer.destination import KvDestination
from services.transfer.sender import KvSender

log = logging.getLogger("pdmesh.prefill")
RENEW_TIMEOUT_S = 2.0
MIN_PERIOD_S = 0.05


class LeaseLapsed(RuntimeError):
    pass


class LeaseKeeper:
    def __init__(self, sender: KvSender, last_step_at: Callable[[], float]) -> None:
        self.sender = sender
        self.last_step_at = last_step_at
        self._stubs: dict[str, pb_grpc.DecodeStub] = {}
        self._channels: list[grpc.aio.Channel] = []
        self._task: asyncio.Task[None] | None = None
        self._renewing: dict[str, asyncio.Task[None]] = {}
        self._shortest_lease = float("inf")  # of the leases confirmed so far: renewals come 4 times as often

    def _stub(self, address: str) -> pb_grpc.DecodeStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = grpc.aio.insecure_channel(address)
            self._channels.append(channel)
            stub = self._stubs[address] = pb_grpc.DecodeStub(channel)
        return stub

    async def _renew(self, address: str, request_ids: list[str]) -> tuple[float, set[str]]:
        sent = time.monotonic()
        reply = await self._stub(address).Renew(
            pb.RenewRequest(request_ids=request_ids), timeout=RENEW_TIMEOUT_S
        )
        return sent, set(reply.held)

    async def confirm(self, request_id: str, destination: KvDestination) -> float:
        """The monotonic time until which the reservation is held (inf without a lease); LeaseLapsed if it is not."""
        if destination.lease_s <= 0 or not destination.lease_address:
            return float("inf")
        try:
            sent, held = await self._renew(destination.lease_address, [request_id])
        except grpc.aio.AioRpcError as e:
            raise LeaseLapsed(
                f"the decode worker at {destination.lease_address} did not answer: {e.details()}"
            ) from e
        if request_id not in held:
            raise LeaseLapsed(
                f"the decode worker no longer holds the reservation of {request_id} (lapsed or released)"
            )
        self._shortest_lease = min(self._shortest_lease, destination.lease_s)
        self._ensure_running()
        return sent + destination.lease_s

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(max(MIN_PERIOD_S, self._shortest_lease / 4))
            now = time.monotonic()
            by_address: dict[str, list[str]] = defaultdict(list)
            for t in self.sender.active():
                progress = max(t.last_progress, self.last_step_at())
                if t.destination.lease_s > 0 and now - progress < t.destination.lease_s:
                    by_address[t.destination.lease_address].append(t.request_id)
            for address, ids in by_address.items():
                # NOTE: one renewal in flight per decode worker, none awaited here: a stalled peer delays no other
                if address not in self._renewing or self._renewing[address].done():
                    self._renewing[address] = asyncio.create_task(self._renew_all(address, ids))

    async def _renew_all(self, address: str, request_ids: list[str]) -> None:
        try:
            sent, held = await self._renew(address, request_ids)
        except grpc.aio.AioRpcError as e:  # unreachable: the leases run out on their own
            log.warning("could not renew %d reservations at %s: %s", len(request_ids), address, e.details())
            return
        for rid in request_ids:
            t = self.sender.requests.get(rid)
            if t is None:
                continue
            if rid in held:
                self.sender.renewed(rid, sent + t.destination.lease_s)
            else:
                self.sender.lapsed(
                    rid, f"the decode worker released the reservation of {rid} (lapsed or aborted)"
                )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for channel in self._channels:
            await channel.close()
