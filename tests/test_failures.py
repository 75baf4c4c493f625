"""Failures: a worker killed mid-request gives the client an error within 10 s, the router stays up, later requests
succeed on the surviving workers, and the survivors hold no leaked blocks."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cluster import Cluster, load, start_cluster, wait_until


@pytest.fixture
def cluster(llama_checkpoint: Path, tmp_path: Path) -> Iterator[Cluster]:
    # small prefill chunks make a long prompt take long enough to be caught mid-prefill
    c = start_cluster(
        llama_checkpoint,
        tmp_path,
        prefill=2,
        decode=2,
        worker_args=("--max-num-batched-tokens", "4", "--quarantine", "2"),
    )
    yield c
    c.stop()


def body(model: str, prompt_len: int, max_tokens: int, stream: bool) -> dict:
    rng = random.Random(prompt_len)
    return {
        "model": model,
        "prompt": [0] + [rng.randrange(4, 500) for _ in range(prompt_len - 1)],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


def stream_until_error(url: str, payload: dict, on_first_event) -> tuple[str, float]:  # type: ignore[no-untyped-def]
    """Returns ('error' | 'done', seconds from the first event to the end)."""
    first = None
    with httpx.stream("POST", f"{url}/v1/completions", json=payload, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if first is None:
                first = time.monotonic()
                on_first_event()
            if line.startswith('data: {"error"'):
                return "error", time.monotonic() - first
            if line == "data: [DONE]":
                return "done", time.monotonic() - first
    return "error", time.monotonic() - (first or time.monotonic())


def healthy_after(cluster: Cluster, model: str) -> None:
    for i in range(6):  # round-robin reaches every surviving worker
        r = httpx.post(f"{cluster.url}/v1/completions", json=body(model, 20 + i, 8, False), timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
    for proc in cluster.procs:
        if proc.address and proc.alive():
            wait_until(lambda a=proc.address: load(a).used_blocks == 0, 10, f"{proc.name} to hold no blocks")


def test_decode_worker_killed_mid_stream(cluster: Cluster, llama_checkpoint: Path) -> None:
    model = llama_checkpoint.name
    victim = None

    def kill_the_decoding_worker() -> None:
        nonlocal victim
        victim = next(p for p in cluster.of_role("decode") if load(p.address).running > 0)
        victim.kill()

    outcome, seconds = stream_until_error(cluster.url, body(model, 40, 2000, True), kill_the_decoding_worker)
    assert outcome == "error" and seconds < 10, (outcome, seconds)
    assert victim is not None and not victim.alive()
    healthy_after(cluster, model)
    assert httpx.get(f"{cluster.url}/health").status_code == 200


def send_and_kill_prefill(cluster: Cluster, payload: dict) -> tuple[dict, float]:
    """Send a long prefill, kill the prefill worker running it; returns the response and seconds after the kill."""
    result: dict = {}

    def send() -> None:
        r = httpx.post(f"{cluster.url}/v1/completions", json=payload, timeout=60)
        result.update(status=r.status_code, body=r.json())

    thread = threading.Thread(target=send)
    thread.start()
    busy = None

    def prefilling() -> bool:
        nonlocal busy
        live = [p for p in cluster.of_role("prefill") if p.alive()]
        busy = next((p for p in live if load(p.address).running > 0), None)
        return busy is not None

    wait_until(prefilling, 20, "a prefill worker to start on the request", interval=0.02)
    busy.kill()
    killed = time.monotonic()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the client hung"
    return result, time.monotonic() - killed


def test_prefill_worker_killed_mid_prefill(cluster: Cluster, llama_checkpoint: Path) -> None:
    model = llama_checkpoint.name
    payload = body(model, 1800, 4, False)  # 450 chunks of 4 tokens: long enough to be interrupted
    # with another prefill worker alive, the router retries there (the decode reservation is reused)
    result, _ = send_and_kill_prefill(cluster, payload)
    assert result["status"] == 200, result
    assert result["body"]["usage"]["completion_tokens"] == 4
    healthy_after(cluster, model)
    # with none left, the client gets a clear error quickly and the router stays up
    result, seconds = send_and_kill_prefill(cluster, body(model, 1700, 4, False))
    assert result["status"] == 503 and "prefill" in result["body"]["error"]["message"], result
    assert seconds < 10
    assert httpx.get(f"{cluster.url}/health").status_code == 503
    for proc in cluster.of_role("decode"):  # the abandoned reservation was released (quarantined, then freed)
        wait_until(
            lambda a=proc.address: load(a).used_blocks == 0, 10, f"{proc.name} to free the reservation"
        )


def test_client_gone_during_prefill_aborts_both_legs(cluster: Cluster, llama_checkpoint: Path) -> None:
    payload = body(llama_checkpoint.name, 2000, 4, False)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up while the prompt is still being prefilled
        httpx.post(f"{cluster.url}/v1/completions", json=payload, timeout=0.3)
    gone = time.monotonic()
    # the router saw the disconnect and aborted the prefill, which confirmed no KV write was in flight, so the
    # decode reservation is freed at once (well inside this cluster's 2 s quarantine for unconfirmed releases)
    for proc in cluster.procs:
        if proc.address:
            wait_until(
                lambda a=proc.address: load(a).used_blocks == 0 and load(a).running == 0,
                10,
                f"{proc.name} to drop the abandoned request",
                interval=0.02,
            )
    assert time.monotonic() - gone < 1.9
    prefilled = sum(load(p.address).computed_prompt_tokens for p in cluster.of_role("prefill"))
    assert 0 < prefilled < 2000, "the prefill was meant to be interrupted part-way"
    assert all(load(p.address).computed_tokens == 0 for p in cluster.of_role("decode"))
