"""Parallel colocated workers as users run them: `pdmesh colocated --tp 2` and `--dp 2 --ep 2` (2 gloo ranks in
real processes behind one gRPC server), called through the router; tokens equal one process's, the load adds up
over replicas, a disconnect frees every rank's blocks, a lost rank takes the worker down, and stopping it stops
every rank."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from services.engine import LLM, SamplingParams
from tests.cluster import Cluster, load, random_prompts, start_cluster, stream_completion, wait_until

MAX_TOKENS = 12
PROMPTS = random_prompts(11, [5, 23, 40, 9])
WORKER = ("--block-size", "4", "--max-num-batched-tokens", "24")


def model_name(path: Path) -> str:
    return path.name


def expected(model: Path, device: str = "cpu") -> list[list[int]]:
    llm = LLM(str(model), device=device, dtype="float32", block_size=4, progress=False)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return [o.token_ids for o in llm.generate(PROMPTS, params, progress=False)]


def followers(pid: int) -> list[int]:
    """The worker's rank processes (its multiprocessing children, not the resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    ranks = []
    for child in map(int, children):
        cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if "multiprocessing" in cmd and "resource_tracker" not in cmd:
            ranks.append(child)
    return ranks


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
    return bool(stat) and stat.split()[2] != "Z"


@pytest.fixture(scope="module")
def tp_cluster(dense: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = start_cluster(
        dense, tmp_path_factory.mktemp("tp"), "colocated", worker_args=(*WORKER, "--tp", "2")
    )
    yield cluster
    cluster.stop()


def complete_all(cluster: Cluster, model: Path) -> list[list[int]]:
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = pool.map(
            lambda p: stream_completion(cluster.url, model_name(model), p, MAX_TOKENS), PROMPTS
        )
    return [tokens for tokens, _, _ in results]


def test_tensor_parallel_worker_matches_one_process(tp_cluster: Cluster, dense: Path) -> None:
    worker = tp_cluster.of_role("colocated")[0]
    assert len(followers(worker.popen.pid)) == 1
    assert complete_all(tp_cluster, dense) == expected(dense)
    wait_until(lambda: load(worker.address).running == 0, 10, "the requests to finish")
    after = load(worker.address)
    assert after.used_blocks == 0 and after.waiting == 0
    assert after.computed_tokens >= sum(map(len, PROMPTS))

    # the worker's prefix cache reaches the router's index (tensor-parallel ranks share one block table)
    def indexed() -> float:
        for line in httpx.get(f"{tp_cluster.url}/metrics", timeout=5).text.splitlines():
            if line.startswith("pdmesh_router_kv_index_blocks{") and worker.address in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    full_blocks = sum((len(p) - 1) // 4 for p in PROMPTS)  # block size 4 (WORKER)
    wait_until(lambda: indexed() >= full_blocks, 10, "the router to index the worker's cached blocks")


def test_disconnect_frees_every_rank(tp_cluster: Cluster, dense: Path) -> None:
    worker = tp_cluster.of_role("colocated")[0]
    body = {"model": model_name(dense), "prompt": PROMPTS[2], "max_tokens": 400, "stream": True}
    body |= {"temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", f"{tp_cluster.url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert any(next(lines).startswith("data: {") for _ in range(6))
        assert load(worker.address).running == 1
    wait_until(
        lambda: load(worker.address).running == 0 and load(worker.address).used_blocks == 0,
        10,
        "every rank to free the disconnected request",
    )
    # the ranks still agree afterwards
    assert complete_all(tp_cluster, dense)[:2] == expected(dense)[:2]


def test_data_parallel_expert_parallel_worker(moe: Path, tmp_path: Path) -> None:
    args = (*WORKER, "--dp", "2", "--ep", "2", "--num-blocks", "300")
    cluster = start_cluster(moe, tmp_path, "colocated", worker_args=args)
    try:
        worker = cluster.of_role("colocated")[0]
        assert complete_all(cluster, moe) == expected(moe)
        wait_until(lambda: load(worker.address).running == 0, 10, "the requests to finish")
        after = load(worker.address)
        assert after.total_blocks == 2 * 300  # both replicas' caches
        assert after.used_blocks == 0
        # each replica's own share, in the worker's report and in the router's metrics
        assert [r.total_blocks for r in after.replicas] == [300, 300]

        def replica_totals() -> list[float]:
            metrics = httpx.get(f"{cluster.url}/metrics", timeout=5).text
            prefix = "pdmesh_worker_replica_kv_blocks_total{"
            return [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(prefix)]

        wait_until(lambda: replica_totals() == [300.0, 300.0], 10, "the router's per-replica metrics")
        # every prompt token computed once, whichever replica served it
        assert after.computed_prompt_tokens == sum(map(len, PROMPTS))
        ranks = followers(worker.popen.pid)
        assert len(ranks) == 1
        worker.stop()
        assert worker.popen.returncode == 0
        wait_until(lambda: not alive(ranks[0]), 10, "the follower rank to exit with the worker")
    finally:
        cluster.stop()


def test_a_lost_rank_takes_the_worker_down(dense: Path, tmp_path: Path) -> None:
    cluster = Cluster(dense, tmp_path)
    try:
        worker = cluster.worker("colocated", *WORKER, "--tp", "2")
        cluster.wait_workers(timeout=120)
        (rank,) = followers(worker.popen.pid)
        os.kill(rank, 9)
        wait_until(lambda: not worker.alive(), 10, "the worker to exit after losing a rank")
        assert worker.popen.returncode != 0
        assert "exited" in worker.tail()
    finally:
        cluster.stop()
