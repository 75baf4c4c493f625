"""Router replicas as a mesh: each follows every worker's KV cache (WatchKvEvents) and routes by it.

Three prefill and three decode workers, two `kv_aware` router replicas and a `round_robin` router (the baseline:
one replica, as before the mesh), all separate processes. A shared-prefix workload alternates between the two
`kv_aware` replicas: every request of a prefix group goes to the worker that holds the prefix, whichever replica
routes it, so the prompt prefix-cache hit rate is at least twice round-robin's and the prefill work is smaller. One replica dying leaves the
other serving; a restarted worker's old entries leave the index at once.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.cluster import Cluster, Proc, spawn, wait_until

PREFIX, SUFFIX, GROUPS, PER_GROUP = 1024, 32, 4, 4


@dataclass
class Mesh:
    cluster: Cluster
    urls: dict[str, list[str]]  # policy -> its router replicas' URLs
    routers: dict[str, Proc]  # URL -> router process


@pytest.fixture(scope="module")
def mesh(llama_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    cluster = Cluster(llama_checkpoint, tmp_path_factory.mktemp("mesh"))
    urls: dict[str, list[str]] = {}
    procs: dict[str, Proc] = {}
    try:
        for _ in range(3):
            cluster.worker("prefill", "--max-num-batched-tokens", "256")
        for _ in range(3):
            cluster.worker("decode")
        cluster.wait_workers()
        for policy in ("kv_aware", "kv_aware", "round_robin"):
            proc = cluster.router("--policy", policy)
            procs[cluster.url] = proc
            urls.setdefault(policy, []).append(cluster.url)
            cluster.wait_ready()
        yield Mesh(cluster, urls, procs)
    finally:
        cluster.stop()


def groups(seed: int) -> list[list[list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(GROUPS):
        prefix = [0] + [rng.randrange(4, 500) for _ in range(PREFIX - 1)]
        out.append([prefix + [rng.randrange(4, 500) for _ in range(SUFFIX)] for _ in range(PER_GROUP)])
    return out


def run(urls: list[str], model: str, workload: list[list[list[int]]]) -> list[dict]:
    """Each group's requests one after another, alternating replicas; returns per request its usage and timings."""
    results = []
    turn = 0
    for group in workload:
        for prompt in group:
            url = urls[turn % len(urls)]
            turn += 1
            body = {"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": True}
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
            results.append(
                {
                    "prompt": usage["prompt_tokens"],
                    "cached": usage["prompt_tokens_details"]["cached_tokens"],
                    "prefill_ms": float(r.headers["x-pdmesh-prefill-ms"]),
                }
            )
            time.sleep(0.15)  # the workers' KV events reach both replicas (they are sent every 50 ms)
    return results


def hit_rate(results: list[dict]) -> float:
    return sum(r["cached"] for r in results) / sum(r["prompt"] for r in results)


def index_blocks(url: str, address: str) -> int:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(
        rf'pdmesh_router_kv_index_blocks{{address="{re.escape(address)}",role="\w+"}} (\S+)', text
    )
    return int(float(match.group(1))) if match else -1


def test_kv_aware_replicas_route_a_prefix_group_to_its_warm_worker(
    mesh: Mesh, llama_checkpoint: Path
) -> None:
    model = llama_checkpoint.name
    rr = run(mesh.urls["round_robin"], model, groups(1))
    kv = run(mesh.urls["kv_aware"], model, groups(2))
    assert hit_rate(kv) >= 2 * hit_rate(rr), (hit_rate(kv), hit_rate(rr))
    # every request after a group's first found the whole shared prefix cached, whichever replica routed it
    for g in range(GROUPS):
        later = kv[g * PER_GROUP + 1 : (g + 1) * PER_GROUP]
        assert all(r["cached"] >= PREFIX - 16 for r in later), later
    assert sum(r["prefill_ms"] for r in kv) < sum(r["prefill_ms"] for r in rr)


def test_a_replica_dies_and_the_other_serves(mesh: Mesh, llama_checkpoint: Path) -> None:
    first, second = mesh.urls["kv_aware"]
    mesh.routers[first].kill()
    body = {"model": llama_checkpoint.name, "prompt": [0, 7, 8, 9], "max_tokens": 3, "ignore_eos": True}
    for _ in range(6):
        r = httpx.post(f"{second}/v1/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text


def test_a_restarted_worker_leaves_no_stale_entries(mesh: Mesh, llama_checkpoint: Path) -> None:
    url = mesh.urls["kv_aware"][-1]
    cluster = mesh.cluster
    warm = max(cluster.of_role("prefill"), key=lambda p: index_blocks(url, p.address))
    assert index_blocks(url, warm.address) > 0
    warm.kill()
    wait_until(
        lambda: index_blocks(url, warm.address) == 0, 5, "the dead worker's entries to leave the index"
    )
    port = warm.address.rsplit(":", 1)[1]
    argv = [
        "prefill",
        "--model",
        str(llama_checkpoint),
        "--port",
        port,
        "--device",
        "cpu",
        "--dtype",
        "float32",
    ]
    argv += ["--num-blocks", "2048", "--max-num-batched-tokens", "256"]
    restarted = spawn(f"{warm.name}-again", argv, cluster.log_dir)
    restarted.address = warm.address
    cluster.procs.append(restarted)

    def healthy() -> bool:
        health = httpx.get(f"{url}/health").json()
        return any(w["address"] == warm.address and w["healthy"] for w in health["workers"])

    wait_until(healthy, 60, "the restarted worker to be back")
    time.sleep(0.5)
    assert index_blocks(url, warm.address) == 0  # back, subscribed again, and empty as it is
    body = {
        "model": llama_checkpoint.name,
        "prompt": [0, *range(5, 100)],
        "max_tokens": 2,
        "ignore_eos": True,
    }
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200
