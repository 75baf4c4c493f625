"""The ranks of one parallel worker: rank 0 serves and drives, the other ranks follow.

A worker with tp x dp > 1 ranks runs one engine per rank (one GPU each, all on this host). Rank 0 runs the gRPC
services, where a `RankGroup` stands in for its engine. Engine calls are queued and sent to every rank, over the
host's gloo group, with the next step, so all ranks apply the same calls in the same order and step together:
- the tensor-parallel ranks of a replica apply every call for that replica: their schedulers stay identical and
  form the same batches, and their samplers (seeded alike) see the same logits, so they draw the same tokens;
- data-parallel replicas serve their own requests: rank 0 gives a new request to the replica with the fewest live
  requests, and each step gathers every replica's outputs (from its first tensor-parallel rank) and load.
A rank that fails a step may have diverged from the others: the group refuses every later call and the worker
exits, for its supervisor to restart it; so does a worker whose follower process died.

Prefill and decode workers give every rank a role object (`make_role(engine)`: its own Mooncake engines,
registered KV pool and, for prefill, staging and KV writers). Calls named `role.<method>` go to it; after every
step it sees the step's outputs (`after_step`), and what it reports (`report()`) reaches rank 0 with the step's.
At start every rank's `target()` (where peers write its KV) is gathered to rank 0. Calls whose answer rank 0
needs at once (a reservation's blocks) are sent without waiting for a step (`call_now`), with every rank's result.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import threading
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from services.common.lifetime import die_with_parent
from services.common.sampling_params import SamplingParams
from services.engine.config import EngineConfig
from services.engine.engine import Engine, LoadCounts, RequestOutput
from services.engine.parallel.comm import gather_into

log = logging.getLogger("pdmesh.worker")
HEARTBEAT_S = 30.0  # idle followers hear from rank 0 at least this often (well inside gloo's timeout)
EXIT_DELAY_S = 1.0  # after a rank fails: time for the failed requests' errors to reach their callers


ALL_REPLICAS = -1


@dataclass(frozen=True)
class Call:
    replica: int  # the data-parallel replica whose ranks apply it (ALL_REPLICAS: every rank)
    method: str  # add_request | abort
    args: tuple[Any, ...]


@dataclass(frozen=True)
class StepReport:
    outputs: list[RequestOutput]  # from a replica's first tensor-parallel rank only
    busy: bool
    load: LoadCounts
    error: str = ""
    results: list[Any] = field(default_factory=list)  # one per call sent (None where another replica's)
    role: Any = None  # what the rank's role reports (e.g. its KV transfers)


class RankGroup:
    """Rank 0's stand-in for its engine: the engine API the services use (ServingEngine), applied on every rank."""

    def __init__(
        self,
        engine: Engine,
        followers: list[mp.process.BaseProcess],
        stopping: threading.Event,
        role: Any = None,
        targets: list[Any] | None = None,
    ) -> None:
        self.engine = engine  # rank 0's
        self.role = role  # rank 0's role object (prefill and decode workers)
        self.targets = targets or []  # every rank's role target, in rank order
        self.role_reports: list[Any] = []  # every rank's role report, as of the last exchange
        self.pending: Callable[[], bool] = lambda: False  # more exchanges needed though no request runs
        self.on_exchange: Callable[[list[Any]], None] | None = None  # gets every rank's role report
        # the same on every rank: the model, the limits, the KV layout
        self.config = engine.config
        self.model_config = engine.model_config
        self.runtime = engine.runtime
        self.parallel = engine.parallel
        self.followers = followers
        self.stopping = stopping  # set: followers may exit without taking the worker down
        self.seqs: dict[str, int] = {}  # live request -> its replica
        self._pending: list[Call] = []
        self._busy = False
        self._loads = [engine.load_counts()] * self.parallel.config.dp
        self._failed = ""
        self._last_sent = time.monotonic()

    # ---- the engine API the services and AsyncEngine use (ServingEngine) -----------------------------------
    @property
    def layout_fingerprint(self) -> str:
        return self.engine.layout_fingerprint

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self.engine.check_request(prompt_ids, params)

    def prefix_cache(self) -> Engine | None:
        # tensor-parallel ranks keep one block table in step: rank 0's is the worker's; replicas have their own
        return self.engine if self.parallel.config.dp == 1 else None

    def add_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, arrival: float | None = None
    ) -> None:
        self._check_alive()
        self.check_request(prompt_ids, params)  # refused here, before any rank sees it
        if request_id in self.seqs:
            raise ValueError(f"request {request_id} is already running")
        replica = self._pick_replica()
        self.seqs[request_id] = replica
        # NOTE: the monotonic clock is the host's, so the arrival means the same on every rank
        self._pending.append(Call(replica, "add_request", (request_id, prompt_ids, params, arrival)))
        self._busy = True

    def abort(self, request_id: str) -> bool:
        replica = self.seqs.pop(request_id, None)
        if replica is None:
            return False
        self._pending.append(Call(replica, "abort", (request_id,)))
        self._busy = True  # the abort reaches the ranks with the next step
        return True

    def has_unfinished(self) -> bool:
        if not self._busy and not self._failed and time.monotonic() - self._last_sent > HEARTBEAT_S:
            self._exchange(step=False)
        return self._busy or self.pending()

    # ---- prefill and decode roles --------------------------------------------------------------------------
    def queue(self, method: str, *args: Any, replica: int = ALL_REPLICAS) -> None:
        """A call the ranks of `replica` apply with the next exchange, in order with the others."""
        self._check_alive()
        self._pending.append(Call(replica, method, args))
        self._busy = True

    def call_now(self, method: str, *args: Any, replica: int = ALL_REPLICAS) -> list[Any]:
        """Apply a call now (after those queued before it); the result of each rank of `replica`, in rank order."""
        self._check_alive()
        self._pending.append(Call(replica, method, args))
        reports = self._exchange(step=False)
        errors = [f"rank {r}: {rep.error}" for r, rep in enumerate(reports) if rep.error]
        if errors:
            self._fail("; ".join(errors))
        return [rep.results[-1] for rep in reports[self._ranks_of(replica)]]

    def targets_of(self, replica: int) -> list[Any]:
        """The role targets of one replica's ranks (its tensor-parallel ranks, in order)."""
        return self.targets[self._ranks_of(replica)]

    def reserve(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Any:
        self.check_request(prompt_ids, params)
        replica = self._pick_replica()
        results = self.call_now("reserve", request_id, prompt_ids, params, replica=replica)
        if any(r != results[0] for r in results):  # the ranks allocate in step, or their KV would not match
            self._fail(f"the ranks reserved different blocks for {request_id}: {results}")
        if results[0] is not None:
            self.seqs[request_id] = replica
        return results[0]

    def admit_prefilled(self, request_id: str, first_token: int) -> list[RequestOutput]:
        replica = self.seqs[request_id]
        outputs = self.call_now("admit_prefilled", request_id, first_token, replica=replica)[0]
        self._busy = True
        for out in outputs:
            if out.finished:
                self.seqs.pop(request_id, None)
        return outputs

    def release(self, request_id: str) -> None:
        self.queue("release", request_id, replica=self.seqs.pop(request_id, ALL_REPLICAS))

    def _pick_replica(self) -> int:
        """The data-parallel replica with the fewest live requests."""
        live = [0] * self.parallel.config.dp
        for replica in self.seqs.values():
            live[replica] += 1
        return min(range(len(live)), key=live.__getitem__)

    def _ranks_of(self, replica: int) -> slice:
        if replica == ALL_REPLICAS:
            return slice(None)
        tp = self.parallel.config.tp
        return slice(replica * tp, (replica + 1) * tp)

    def step(self) -> list[RequestOutput]:
        self._check_alive()
        reports = self._exchange(step=True)
        errors = [f"rank {r}: {rep.error}" for r, rep in enumerate(reports) if rep.error]
        if errors:
            self._fail("; ".join(errors))
        self._busy = any(rep.busy for rep in reports) or bool(self._pending)
        tp = self.parallel.config.tp
        self._loads = [reports[r].load for r in range(0, len(reports), tp)]
        outputs = [out for rep in reports[::tp] for out in rep.outputs]
        for out in outputs:
            if out.finished:
                self.seqs.pop(out.request_id, None)
        return outputs

    def replica_loads(self) -> list[LoadCounts]:
        """Each data-parallel replica's load, as of the last step."""
        return list(self._loads)

    def load_counts(self) -> LoadCounts:
        """The whole worker's load: the sum over its replicas, as of the last step."""
        total = self._loads[0]
        for load in self._loads[1:]:
            total = total + load
        return total

    def close(self) -> None:
        """Stop the followers (they leave their loop and exit)."""
        self.stopping.set()
        if not self._failed:
            self._failed = "the worker is shutting down"
            with contextlib.suppress(RuntimeError):  # a follower already gone: nothing to tell it
                send_calls(STOP, [], self.parallel.host_group)
        for p in self.followers:
            p.join(timeout=10)

    # ---- internals ---------------------------------------------------------------------------------------
    def _exchange(self, step: bool) -> list[StepReport]:
        calls, self._pending = self._pending, []
        self._last_sent = time.monotonic()
        group = self.parallel.host_group
        send_calls(STEP if step else HEARTBEAT, calls, group)
        mine = apply(self.engine, self.role, self.parallel.dp_rank, calls, step)
        reports = share_reports(mine, self.parallel.world, group)
        if self.role is not None:
            self.role_reports = [rep.role for rep in reports]
            if self.on_exchange is not None and not any(rep.error for rep in reports):
                self.on_exchange(self.role_reports)
        return reports

    def _check_alive(self) -> None:
        if self._failed:
            raise RuntimeError(f"this worker's ranks failed ({self._failed}); it is restarting")

    def _fail(self, why: str) -> None:
        self._failed = why
        self.stopping.set()
        log.error("a rank failed, the worker exits: %s", why)
        threading.Timer(EXIT_DELAY_S, os._exit, (1,)).start()
        raise RuntimeError(f"a rank of this worker failed: {why}")


def apply(engine: Engine, role: Any, replica: int, calls: list[Call], step: bool) -> StepReport:
    """What every rank does with a message from rank 0: the calls for its replica, then (maybe) one step."""
    outputs: list[RequestOutput] = []
    results: list[Any] = []
    try:
        for call in calls:
            if call.replica not in (replica, ALL_REPLICAS):
                results.append(None)
                continue
            target, name = (
                (role, call.method[5:]) if call.method.startswith("role.") else (engine, call.method)
            )
            results.append(getattr(target, name)(*call.args))
        if step:
            outputs = engine.step()
            if role is not None:
                role.after_step(engine, outputs)
    except Exception as e:  # reported to rank 0, which fails the worker
        log.exception("rank %d failed", engine.parallel.rank)
        return StepReport([], False, engine.load_counts(), f"{type(e).__name__}: {e}")
    report = role.report() if role is not None else None
    outputs = outputs if engine.parallel.tp_rank == 0 else []
    return StepReport(outputs, engine.busy, engine.load_counts(), "", results, report)


def follow(
    config: EngineConfig, make_role: Callable[[Engine], Any] | None = None, parent_pid: int | None = None
) -> None:
    """A follower rank's process: build the engine (and its role), then apply rank 0's messages until told to stop.
    It dies with rank 0's process: a killed worker leaves no rank holding its GPU."""
    die_with_parent(parent_pid)
    engine = Engine(config)
    role = make_role(engine) if make_role is not None else None
    group, world = engine.parallel.host_group, engine.parallel.world
    if role is not None:
        gather_targets(role, world, group)
    try:
        while (message := receive_calls(group))[0] != STOP:
            kind, calls = message
            share_reports(apply(engine, role, engine.parallel.dp_rank, calls, kind == STEP), world, group)
    finally:
        if role is not None:
            role.close()


def gather_targets(role: Any, world: int, group: dist.ProcessGroup | None) -> list[Any]:
    """Every rank's role target (where peers write its KV), in rank order."""
    targets: list[Any] = [None] * world
    dist.all_gather_object(targets, role.target(), group=group)
    return targets


# ---- the wire: small int64 headers every step; pickled payloads only when there is something to say -----------
STOP, HEARTBEAT, STEP = 0, 1, 2


def send_calls(kind: int, calls: list[Call], group: dist.ProcessGroup | None) -> None:
    payload = pickle.dumps(calls) if calls else b""
    dist.broadcast(torch.tensor([kind, len(payload)], dtype=torch.int64), src=0, group=group)
    if payload:
        dist.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8), src=0, group=group)


def receive_calls(group: dist.ProcessGroup | None) -> tuple[int, list[Call]]:
    head = torch.empty(2, dtype=torch.int64)
    dist.broadcast(head, src=0, group=group)
    kind, size = head.tolist()
    if not size:
        return kind, []
    payload = torch.empty(size, dtype=torch.uint8)
    dist.broadcast(payload, src=0, group=group)
    return kind, pickle.loads(payload.numpy().tobytes())


def share_reports(report: StepReport, world: int, group: dist.ProcessGroup | None) -> list[StepReport]:
    """Every rank's report, in rank order (all ranks take part; rank 0 uses them)."""
    said = report.outputs or report.error or report.results or report.role is not None
    payload = pickle.dumps((report.outputs, report.error, report.results, report.role)) if said else b""
    head = torch.tensor([int(report.busy), len(payload), *astuple(report.load)], dtype=torch.int64)
    heads = torch.empty(world * head.numel(), dtype=torch.int64)
    gather_into(heads, head, group=group)
    rows = heads.view(world, -1).tolist()
    longest = max(row[1] for row in rows)
    payloads: list[bytes] = [b""] * world
    if longest:
        mine = torch.zeros(longest, dtype=torch.uint8)
        mine[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else 0
        everyone = torch.empty(world * longest, dtype=torch.uint8)
        gather_into(everyone, mine, group=group)
        data = everyone.numpy().tobytes()
        payloads = [data[r * longest : r * longest + row[1]] for r, row in enumerate(rows)]
    reports = []
    for row, data in zip(rows, payloads, strict=True):
        outputs, error, results, role = pickle.loads(data) if data else ([], "", [], None)
        reports.append(StepReport(outputs, bool(row[0]), LoadCounts(*row[2:]), error, results, role))
    return reports


def watch(followers: list[mp.process.BaseProcess], stopping: threading.Event) -> None:
    """A follower that exits (crash, out of memory, killed) takes the worker down: the ranks can no longer step
    together, and while rank 0 starts up it would otherwise wait for the lost rank forever."""
    while not stopping.wait(0.5):
        for p in followers:
            if p.exitcode is not None and not stopping.is_set():
                log.error("%s exited (code %s); the worker exits", p.name, p.exitcode)
                os._exit(1)


def start_ranks(
    config: EngineConfig, port: int, make_role: Callable[[Engine], Any] | None = None
) -> RankGroup:
    """Start ranks 1.. as processes on this host, then build rank 0's engine (joining them) and its group;
    `make_role` (picklable) gives every rank its role object."""
    init = f"tcp://127.0.0.1:{port}"
    ctx = mp.get_context("spawn")
    followers = []
    for rank in range(1, config.parallel.world):
        p = ctx.Process(
            target=follow,
            args=(replace(config, rank=rank, dist_init_method=init, progress=False), make_role, os.getpid()),
            name=f"pdmesh-rank-{rank}",
            daemon=True,
        )
        p.start()
        followers.append(p)
    stopping = threading.Event()
    threading.Thread(target=watch, args=(followers, stopping), name="rank-watch", daemon=True).start()
    engine = Engine(replace(config, rank=0, dist_init_method=init))
    if make_role is None:
        return RankGroup(engine, followers, stopping)
    role = make_role(engine)
    targets = gather_targets(role, engine.parallel.world, engine.parallel.host_group)
    return RankGroup(engine, followers, stopping, role, targets)
