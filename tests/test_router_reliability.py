"""The router's reliability on real processes: circuit breakers (open, half-open probe, re-open), retries on
another worker before the first token, admission (a bounded wait, then 429 + Retry-After), deadlines, bounded
multi-prompt requests, and an in-flight count that no disconnect can leak. Faults come from a gRPC proxy in
front of a real worker (tests/fault_proxy.py), which fails requests while the worker still answers its polls."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from services.router.app import _merged
from services.router.pipeline import Delta
from tests.cluster import Cluster, free_port, load, spawn, wait_until
from tests.fault_proxy import FaultProxy

PROMPT = [0, 11, 42, 97, 5, 300, 18, 64]


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(rf"{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m and ",".join(sorted((m.group(1) or "").split(","))) == want:
            return float(m.group(2))
    return 0.0


def start_router(cluster: Cluster, log_dir: Path, *args: str) -> str:
    port = free_port()
    argv = ["router", "--model", str(cluster.model), "--port", str(port), "--served-model-name", "tiny"]
    cluster.procs.append(spawn("router", [*argv, *args], log_dir))
    cluster.url = f"http://127.0.0.1:{port}"
    cluster.wait_ready()
    return cluster.url


def complete(url: str, max_tokens: int = 8, **extra: object) -> httpx.Response:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return httpx.post(f"{url}/v1/completions", json={**body, **extra}, timeout=60)


@pytest.fixture(scope="module")
def fleet(llama_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Two colocated workers, the first behind a fault proxy; a router with a quick breaker."""
    log_dir = tmp_path_factory.mktemp("reliability")
    cluster = Cluster(llama_checkpoint, log_dir)
    proxy = None
    try:
        direct, proxied = cluster.worker("colocated"), cluster.worker("colocated")
        cluster.wait_workers()
        proxy = FaultProxy(proxied.address)
        start_router(
            cluster, log_dir, "--colocated", f"{direct.address},{proxy.start()}", "--policy", "round_robin",
            "--breaker-threshold", "2", "--breaker-cooldown", "2", "--retries", "1",
        )  # fmt: skip
        yield {"url": cluster.url, "proxy": proxy, "direct": direct, "proxied": proxied, "cluster": cluster}
    finally:
        cluster.stop()
        if proxy is not None and proxy.address:
            proxy.stop()


def test_breaker_opens_probes_and_closes(fleet: dict) -> None:
    url, proxy = fleet["url"], fleet["proxy"]
    expected = complete(url).json()["choices"][0]["text"]
    proxy.fail("Generate")
    before = proxy.calls["Generate"]
    # every request still succeeds (retried on the other worker); the faulty one is cut off after 2 failures
    for _ in range(8):
        r = complete(url)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected
    assert proxy.calls["Generate"] - before == 2
    label = {"role": "colocated", "address": proxy.address}
    assert metric(url, "pdmesh_router_retries_total", **label) == 2
    assert metric(url, "pdmesh_router_breaker_trips_total", **label) == 1
    wait_until(lambda: metric(url, "pdmesh_router_breaker_state", **label) == 2, 10, "breaker state open")
    health = httpx.get(f"{url}/health", timeout=5).json()
    assert {w["address"]: w["breaker"] for w in health["workers"]}[proxy.address] == "open"

    # after the cooldown one probe goes through; it fails, so the breaker opens again for longer (4 s)
    time.sleep(2.2)
    before = proxy.calls["Generate"]
    for _ in range(4):
        assert complete(url).status_code == 200
    assert proxy.calls["Generate"] - before == 1  # exactly one probe
    assert metric(url, "pdmesh_router_breaker_trips_total", **label) == 2

    # healed: after the (doubled) cooldown the probe succeeds and the worker takes its share again
    proxy.heal()
    time.sleep(4.2)
    before = proxy.calls["Generate"]
    for _ in range(6):
        r = complete(url)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
    assert proxy.calls["Generate"] - before >= 2
    wait_until(lambda: metric(url, "pdmesh_router_breaker_state", **label) == 0, 10, "breaker state closed")


def test_admission_waits_then_429(llama_checkpoint: Path, tmp_path: Path) -> None:
    """One slot; the worker is made slow (its Generate held 3 s by the proxy), so the slot stays taken."""
    cluster = Cluster(llama_checkpoint, tmp_path)
    proxy = None
    try:
        worker = cluster.worker("colocated")
        cluster.wait_workers()
        proxy = FaultProxy(worker.address)
        url = start_router(
            cluster, tmp_path, "--colocated", proxy.start(), "--max-in-flight", "1", "--queue-timeout", "1"
        )

        async def run(queue: int) -> list[tuple[int, float, httpx.Response]]:
            async with httpx.AsyncClient(timeout=60) as http:

                async def one(after: float) -> tuple[int, float, httpx.Response]:
                    await asyncio.sleep(after)
                    started = time.monotonic()
                    r = await http.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": PROMPT})
                    return r.status_code, time.monotonic() - started, r

                return await asyncio.gather(one(0), *(one(0.3) for _ in range(queue)))

        proxy.delay("Generate", 3.0)
        (first, _, _), (third, waited, r) = asyncio.run(run(1))
        assert first == 200
        assert third == 429, r.text
        assert r.headers["retry-after"] == "1"
        assert "in flight" in r.json()["error"]["message"]
        assert 0.8 < waited < 2.5  # it waited for a slot (--queue-timeout 1) before being turned away

        # queued requests that find the slot within their wait are served, in turn
        proxy.delay("Generate", 0.2)
        results = asyncio.run(run(2))
        assert [status for status, _, _ in results] == [200, 200, 200]
        assert sorted(w for _, w, _ in results)[-1] > 0.35  # the last one waited for two before it
        assert metric(url, "pdmesh_requests_total", endpoint="completions", status="429") == 1

        # the prompts of one request go out together: three held 1 s each take about 1 s, not 3
        proxy.delay("Generate", 1.0)
        started = time.monotonic()
        body = {"model": "tiny", "prompt": [PROMPT, PROMPT[:4], PROMPT[:6]], "max_tokens": 2}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and len(r.json()["choices"]) == 3, r.text
        assert time.monotonic() - started < 2.5
    finally:
        cluster.stop()
        if proxy is not None and proxy.address:
            proxy.stop()


def test_deadline_ends_requests_and_frees_workers(fleet: dict) -> None:
    url = fleet["url"]
    headers = {"x-pdmesh-timeout": "0.5"}
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True}
    started = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 504, r.text
    assert "deadline" in r.json()["error"]["message"]
    assert time.monotonic() - started < 5
    events = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, headers=headers) as s:
        assert s.status_code == 200
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert "deadline" in events[-1]["error"]["message"]
    assert len(events) > 1  # tokens came before the deadline ended it
    bad = httpx.post(f"{url}/v1/completions", json=body, headers={"x-pdmesh-timeout": "soon"}, timeout=10)
    assert bad.status_code == 400 and "x-pdmesh-timeout" in bad.json()["error"]["message"]
    for proc in (fleet["direct"], fleet["proxied"]):
        wait_until(lambda p=proc: load(p.address).running == 0, 10, f"{proc.name} to drop the request")


def test_disconnects_never_leak_a_slot(fleet: dict) -> None:
    url = fleet["url"]
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 300, "ignore_eos": True}

    async def leave(after: float, stream: bool) -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            try:
                async with asyncio.timeout(after):
                    if stream:
                        async with http.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:  # fmt: skip
                            async for _ in r.aiter_lines():
                                pass
                    else:
                        await http.post(f"{url}/v1/completions", json=body)
            except TimeoutError:
                pass

    async def run() -> None:
        for after in (0.01, 0.05, 0.2, 0.6):
            await asyncio.gather(leave(after, True), leave(after, False))

    asyncio.run(run())
    wait_until(
        lambda: metric(url, "pdmesh_requests_in_flight") == 0, 15, "the in-flight count to return to 0"
    )
    for proc in (fleet["direct"], fleet["proxied"]):
        wait_until(lambda p=proc: load(p.address).running == 0, 15, f"{proc.name} to drop the requests")
    assert complete(url).status_code == 200  # both slots are free again


def test_multi_prompt_bounded_and_served_concurrently(fleet: dict) -> None:
    url = fleet["url"]
    prompts = [PROMPT, PROMPT[:5], [0, 7, 7, 7]]
    r = httpx.post(
        f"{url}/v1/completions",
        json={"model": "tiny", "prompt": prompts, "max_tokens": 6, "temperature": 0, "ignore_eos": True},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    singles = [complete(url, 6, prompt=p).json()["choices"][0]["text"] for p in prompts]
    assert texts == singles
    too_many = httpx.post(
        f"{url}/v1/completions", json={"model": "tiny", "prompt": [PROMPT] * 65}, timeout=10
    )
    assert too_many.status_code == 400 and "--max-prompts" in too_many.json()["error"]["message"]


def test_merged_streams_buffer_is_bounded() -> None:
    """A client that stops reading stops the reads from the workers: at most a few chunks wait in between."""
    produced = [0, 0]

    class Endless:
        def __init__(self, i: int) -> None:
            self.i = i

        async def __aiter__(self):  # type: ignore[no-untyped-def]
            while True:
                produced[self.i] += 1
                yield Delta([1], "x", [])
                await asyncio.sleep(0)

    async def run() -> None:
        merged = _merged([Endless(0), Endless(1)])  # type: ignore[list-item]
        await merged.__anext__()  # the client reads one chunk, then stops
        await asyncio.sleep(0.3)
        await merged.aclose()

    asyncio.run(run())
    assert sum(produced) <= 8, produced


def test_prefill_failure_retried_on_another_prefill_worker(llama_checkpoint: Path, tmp_path: Path) -> None:
    """PD: a prefill worker failing every Prefill is skipped by a retry; the client gets the right tokens."""
    cluster = Cluster(llama_checkpoint, tmp_path)
    proxy = None
    try:
        good, bad = cluster.worker("prefill"), cluster.worker("prefill")
        decode = cluster.worker("decode")
        cluster.wait_workers()
        proxy = FaultProxy(bad.address)
        proxy.start()
        proxy.fail("Prefill", grpc.StatusCode.UNAVAILABLE)
        start_router(
            cluster, tmp_path, "--prefill", f"{good.address},{proxy.address}", "--decode", decode.address,
            "--policy", "round_robin", "--breaker-threshold", "5",
        )  # fmt: skip
        texts = set()
        for _ in range(4):
            r = complete(cluster.url)
            assert r.status_code == 200, r.text
            texts.add(r.json()["choices"][0]["text"])
        assert len(texts) == 1
        assert proxy.calls["Prefill"] >= 1  # it was tried, failed, and the request went on elsewhere
        assert metric(cluster.url, "pdmesh_router_retries_total", role="prefill", address=proxy.address) >= 1
        wait_until(lambda: load(decode.address).used_blocks == 0, 15, "the decode worker to hold no KV")
    finally:
        cluster.stop()
        if proxy is not None and proxy.address:
            proxy.stop()
