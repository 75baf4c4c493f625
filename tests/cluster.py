"""Start real pdmesh processes (workers, router) for end-to-end tests, and tear them down without leaks."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from pdmesh.v1 import worker_pb2 as pb
from pdmesh.v1 import worker_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    address: str = ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait(timeout=10)

    def stop(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def spawn(name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Proc:
    log = log_dir / f"{name}.log"
    with open(log, "wb") as f:
        popen = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *argv],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    return Proc(name, popen, log)


def load(address: str) -> pb.Load:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.WorkerStub(channel).GetLoad(pb.GetLoadRequest(), timeout=5)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def http_json(url: str, timeout: float = 5) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except OSError:
        return 0, {}


@dataclass
class Cluster:
    """Workers and a router as separate processes, started with the `pdmesh` command."""

    model: Path
    log_dir: Path
    procs: list[Proc] = field(default_factory=list)
    url: str = ""

    def worker(self, role: str, *extra: str) -> Proc:
        port = free_port()
        index = sum(p.name.startswith(role) for p in self.procs)
        argv = [
            role,
            "--model",
            str(self.model),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--num-blocks",
            "2048",
            *extra,
        ]
        proc = spawn(f"{role}-{index}", argv, self.log_dir)
        proc.address = f"127.0.0.1:{port}"
        self.procs.append(proc)
        return proc

    def router(self, *extra: str, model: Path | None = None) -> Proc:
        """A router in front of every worker (model: another folder with the tokenizer and chat template)."""
        port = free_port()
        argv = ["router", "--model", str(model or self.model), "--port", str(port)]
        for role in ("prefill", "decode", "colocated"):
            addresses = [p.address for p in self.procs if p.name.startswith(role)]
            if addresses:
                argv += [f"--{role}", ",".join(addresses)]
        proc = spawn("router", [*argv, *extra], self.log_dir)
        self.procs.append(proc)
        self.url = f"http://127.0.0.1:{port}"
        return proc

    def wait_ready(self, timeout: float = 120) -> None:
        def ready() -> bool:
            for p in self.procs:
                if not p.alive():
                    raise RuntimeError(f"{p.name} exited ({p.popen.returncode}):\n{p.tail()}")
            status, health = http_json(f"{self.url}/health")
            return status == 200 and all(w["healthy"] for w in health["workers"])

        wait_until(ready, timeout, "the cluster to become healthy", interval=0.2)

    def wait_workers(self, timeout: float = 60) -> None:
        """Until every worker answers GetLoad (no router needed)."""

        def up(proc: Proc) -> bool:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")
            try:
                load(proc.address)
                return True
            except grpc.RpcError:
                return False

        for proc in self.procs:
            if proc.address:
                wait_until(lambda p=proc: up(p), timeout, f"{proc.name} to answer")

    def of_role(self, role: str) -> list[Proc]:
        return [p for p in self.procs if p.name.startswith(role)]

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


def start_cluster(
    model: Path,
    log_dir: Path,
    mode: str = "pd",
    prefill: int = 1,
    decode: int = 1,
    worker_args: tuple[str, ...] = (),
    router_args: tuple[str, ...] = (),
) -> Cluster:
    cluster = Cluster(model, log_dir)
    try:
        if mode == "colocated":
            cluster.worker("colocated", *worker_args)
        else:
            for _ in range(prefill):
                cluster.worker("prefill", *worker_args)
            for _ in range(decode):
                cluster.worker("decode", *worker_args)
        cluster.router(*router_args)
        cluster.wait_ready()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def random_prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[0] + [rng.randrange(4, 500) for _ in range(n - 1)] for n in lengths]


def stream_completion(
    url: str, model: str, prompt: list[int], max_tokens: int
) -> tuple[list[int], str, dict]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    tokens: list[int] = []
    text = ""
    usage: dict = {}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            if event["choices"]:
                tokens += event["choices"][0]["token_ids"]
                text += event["choices"][0]["text"]
            else:
                usage = event
    return tokens, text, usage
