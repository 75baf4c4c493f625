"""Prometheus metrics of the router (one registry per app, so several routers can live in one process)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "pdmesh_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"], registry=r
        )
        self.in_flight = Gauge("pdmesh_requests_in_flight", "Requests being served", registry=r)
        self.prompt_tokens = Counter("pdmesh_prompt_tokens", "Prompt tokens of served requests", registry=r)
        self.generation_tokens = Counter("pdmesh_generation_tokens", "Tokens generated", registry=r)
        self.cached_tokens = Counter(
            "pdmesh_cached_prompt_tokens", "Prompt tokens served from prefix caches", registry=r
        )
        self.ttft = Histogram(
            "pdmesh_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "pdmesh_time_per_output_token_seconds",
            "Mean time per output token after the first",
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "pdmesh_inter_token_latency_seconds",
            "Time between consecutive chunks of a streamed response, as its client gets them (a chunk holds the "
            "tokens that were ready together, usually one)",
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "pdmesh_e2e_request_latency_seconds", "Request latency", buckets=LATENCY_BUCKETS, registry=r
        )
        self.phase = Histogram(
            "pdmesh_ttft_phase_seconds",
            "Time to first token by phase (queue, prefill, transfer, first_decode, router)",
            ["phase"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.worker_up = Gauge("pdmesh_worker_up", "1 if the worker answers", ["role", "address"], registry=r)
        self.worker_waiting = Gauge(
            "pdmesh_worker_waiting_requests", "Requests queued at the worker", ["role", "address"], registry=r
        )
        self.worker_kv_used = Gauge(
            "pdmesh_worker_kv_blocks_used", "KV blocks in use", ["role", "address"], registry=r
        )
        self.worker_kv_total = Gauge(
            "pdmesh_worker_kv_blocks_total", "KV blocks", ["role", "address"], registry=r
        )
        self.worker_running = Gauge(
            "pdmesh_worker_running_requests", "Running requests", ["role", "address"], registry=r
        )
        self.worker_bytes = Gauge(
            "pdmesh_worker_kv_transferred_bytes", "KV bytes sent or received", ["role", "address"], registry=r
        )
        self.selections = Counter(
            "pdmesh_router_selections",
            "Workers picked, by role, worker and policy",
            ["role", "address", "policy"],
            registry=r,
        )
        self.routed_prompt_tokens = Counter(
            "pdmesh_router_routed_prompt_tokens",
            "Prompt tokens of the requests routed, by role and worker",
            ["role", "address"],
            registry=r,
        )
        self.routed_cached_tokens = Counter(
            "pdmesh_router_routed_cached_tokens",
            "Of those, tokens the chosen worker held in its prefix cache at routing time (by the router's index)",
            ["role", "address"],
            registry=r,
        )
        self.kv_index_blocks = Gauge(
            "pdmesh_router_kv_index_blocks",
            "Blocks of the worker's prefix cache in this router's index",
            ["role", "address"],
            registry=r,
        )
        self.kv_events_age = Gauge(
            "pdmesh_router_kv_events_age_seconds",
            "Time since the worker's last KV event batch reached this router (it sends one per interval with news)",
            ["role", "address"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "pdmesh_router_breaker_state",
            "The worker's circuit breaker in this router: 0 closed, 1 half open (probing), 2 open",
            ["role", "address"],
            registry=r,
        )
        self.breaker_trips = Counter(
            "pdmesh_router_breaker_trips",
            "Times the worker's circuit breaker opened",
            ["role", "address"],
            registry=r,
        )
        self.retries = Counter(
            "pdmesh_router_retries",
            "Requests retried on another worker after this one failed before the first token",
            ["role", "address"],
            registry=r,
        )
        self.admission_waiting = Gauge(
            "pdmesh_router_admission_waiting",
            "Requests waiting for a slot (beyond --max-in-flight)",
            registry=r,
        )
        self.replica_running = Gauge(
            "pdmesh_worker_replica_running_requests",
            "Running requests per data-parallel replica of the worker (--dp > 1)",
            ["role", "address", "replica"],
            registry=r,
        )
        self.replica_waiting = Gauge(
            "pdmesh_worker_replica_waiting_requests",
            "Waiting requests per data-parallel replica of the worker",
            ["role", "address", "replica"],
            registry=r,
        )
        self.replica_kv_used = Gauge(
            "pdmesh_worker_replica_kv_blocks_used",
            "KV blocks in use per data-parallel replica of the worker",
            ["role", "address", "replica"],
            registry=r,
        )
        self.replica_kv_total = Gauge(
            "pdmesh_worker_replica_kv_blocks_total",
            "KV blocks per data-parallel replica of the worker",
            ["role", "address", "replica"],
            registry=r,
        )
        self._replicas: dict[tuple[str, str], int] = {}  # (role, address) -> replicas exported
        self._per_worker = (
            self.worker_up,
            self.worker_kv_used,
            self.worker_kv_total,
            self.worker_running,
            self.worker_waiting,
            self.worker_bytes,
            self.kv_index_blocks,
            self.kv_events_age,
            self.breaker_state,
        )

    def export_replicas(self, role: str, address: str, replicas: Sequence[object]) -> None:
        self._replicas[role, address] = len(replicas)
        for i, r in enumerate(replicas):
            labels = (role, address, str(i))
            self.replica_running.labels(*labels).set(r.running)  # type: ignore[attr-defined]
            self.replica_waiting.labels(*labels).set(r.waiting)  # type: ignore[attr-defined]
            self.replica_kv_used.labels(*labels).set(r.used_blocks)  # type: ignore[attr-defined]
            self.replica_kv_total.labels(*labels).set(r.total_blocks)  # type: ignore[attr-defined]

    def forget_worker(self, role: str, address: str) -> None:
        """Drop the gauges of a worker that left the fleet (counters stay: they are history)."""
        for gauge in self._per_worker:
            with contextlib.suppress(KeyError):
                gauge.remove(role, address)
        replica_gauges = (
            self.replica_running,
            self.replica_waiting,
            self.replica_kv_used,
            self.replica_kv_total,
        )
        for i in range(self._replicas.pop((role, address), 0)):
            for gauge in replica_gauges:
                gauge.remove(role, address, str(i))
