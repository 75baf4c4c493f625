"""`pdmesh up` starts a router and workers as processes, serves requests, and stops them all on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.cluster import ROOT, free_port, wait_until


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.mark.parametrize("mode", ["pd", "colocated"])
def test_up_serves_and_stops_everything(tmp_path: Path, mode: str) -> None:
    key = ["--api-key", "s3cret"] if mode == "colocated" else []
    auth = {"Authorization": "Bearer s3cret"} if key else {}
    port = free_port()
    env = {**os.environ, "PDMESH_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "up.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "up",
            "--port",
            str(port),
            "--mode",
            mode,
            "--num-blocks",
            "512",
            "--device",
            "cpu",
            *key,
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(
            lambda: "ready at" in (tmp_path / "up.log").read_text() or proc.poll() is not None,
            120,
            "pdmesh up to be ready",
        )
        output = (tmp_path / "up.log").read_text()
        assert proc.poll() is None, output
        assert f"http://127.0.0.1:{port}" in output and "curl" in output
        workers = children(proc.pid)
        assert len(workers) == (3 if mode == "pd" else 2)  # workers and the router, each a process
        request = {
            "model": "tiny-llama",
            "messages": [{"role": "user", "content": "Hello!"}],
            "max_tokens": 8,
            "ignore_eos": True,
        }
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        if key:
            denied = httpx.post(url, json=request, timeout=30)
            assert denied.status_code == 401 and "API key" in denied.json()["error"]["message"]
        r = httpx.post(url, json=request, headers=auth, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        time.sleep(0.5)
        for pid in workers:
            status = Path(f"/proc/{pid}/status")
            assert not status.exists() or "zombie" in status.read_text().lower()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_up_restarts_a_worker_that_dies(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PDMESH_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    argv = ["up", "--port", str(port), "--decode", "2", "--num-blocks", "512", "--device", "cpu"]
    log = (tmp_path / "up.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", *argv], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    request = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 4, "ignore_eos": True}

    def all_healthy() -> bool:
        try:
            health = httpx.get(f"{url}/health", timeout=2).json()
        except httpx.HTTPError:
            return False
        return len(health["workers"]) == 3 and all(w["healthy"] for w in health["workers"])

    try:
        wait_until(lambda: "ready at" in (tmp_path / "up.log").read_text(), 120, "pdmesh up to be ready")
        wait_until(all_healthy, 30, "every worker to be healthy")
        workers = children(proc.pid)
        decode = next(
            pid
            for pid in workers
            if "decode" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        )
        os.kill(decode, signal.SIGKILL)
        # the cluster goes on serving with the other decode worker, then gets the killed one back
        for _ in range(4):
            r = httpx.post(f"{url}/v1/completions", json=request, timeout=30)
            assert r.status_code == 200, r.text
        wait_until(
            lambda: "decode-" in (tmp_path / "up.log").read_text() and all_healthy(), 60, "the restart"
        )
        assert proc.poll() is None
        output = (tmp_path / "up.log").read_text()
        assert "restarting it in 1s" in output and "restarted" in output, output
        assert len(children(proc.pid)) == len(workers) and decode not in children(proc.pid)
        for _ in range(4):  # round-robin reaches the restarted worker too
            assert httpx.post(f"{url}/v1/completions", json=request, timeout=30).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_up_with_router_replicas_on_one_port(tmp_path: Path) -> None:
    """`--routers 2`: two router processes share the port; killing one leaves the other serving every request,
    and `up` starts it again."""
    port = free_port()
    env = {**os.environ, "PDMESH_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    argv = ["up", "--port", str(port), "--mode", "colocated", "--routers", "2", "--num-blocks", "512"]
    log = (tmp_path / "up.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", *argv, "--device", "cpu"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    request = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 4, "ignore_eos": True}

    def replicas(n: int) -> set[str]:
        seen = set()
        for _ in range(n):  # a new connection each time: the kernel picks a replica per connection
            try:
                health = httpx.get(f"{url}/health", timeout=5)
            except httpx.HTTPError:
                continue
            if health.status_code == 200:
                seen.add(health.json()["replica"])
        return seen

    try:
        wait_until(lambda: "ready at" in (tmp_path / "up.log").read_text(), 120, "pdmesh up to be ready")
        assert "2 router replicas" in (tmp_path / "up.log").read_text()
        wait_until(lambda: len(replicas(20)) == 2, 30, "both replicas to answer")
        victim = int(sorted(replicas(20))[0].rsplit(":", 1)[1])
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: not Path(f"/proc/{victim}/cmdline").exists(), 10, "the replica to be gone")
        for _ in range(8):  # every new connection now reaches the surviving replica
            r = httpx.post(f"{url}/v1/completions", json=request, timeout=30)
            assert r.status_code == 200, r.text
        wait_until(lambda: "router-" in (tmp_path / "up.log").read_text() and len(replicas(20)) == 2, 60, "the restart")  # fmt: skip
        assert f":{victim}" not in "".join(replicas(20))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_router_processes_on_one_port(llama_checkpoint: Path, tmp_path: Path) -> None:
    """`pdmesh router --workers 2`: two processes behind one port, both serving."""
    from tests.cluster import Cluster

    cluster = Cluster(llama_checkpoint, tmp_path)
    try:
        cluster.worker("colocated")
        cluster.wait_workers()
        cluster.router("--workers", "2")
        cluster.wait_ready()
        seen: set[str] = set()
        wait_until(
            lambda: (
                seen.update(
                    httpx.get(f"{cluster.url}/health", timeout=5).json()["replica"] for _ in range(10)
                )
                or len(seen) == 2
            ),
            30,
            "both router processes to answer",
        )
        body = {"model": llama_checkpoint.name, "prompt": "hello", "max_tokens": 4}
        assert all(httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=30).status_code == 200 for _ in range(6))  # fmt: skip
        router = cluster.procs[-1]
        router.stop()
        assert router.popen.returncode == 0
        time.sleep(0.5)
        assert not children(router.popen.pid)  # the supervisor took its processes down with it
    finally:
        cluster.stop()
