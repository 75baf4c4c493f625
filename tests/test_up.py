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
