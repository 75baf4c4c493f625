"""`pdmesh up`: a whole cluster on this machine — router plus prefill and decode (or colocated) workers.

Every component is its own process, as in a real deployment; their logs go to one folder. Ctrl-C or SIGTERM
stops them all. A component that dies before the cluster is ready stops everything (a configuration error shows
its last log lines); once the cluster serves, a component that dies is restarted on its port with backoff, and the
router picks the restarted worker up when it answers again.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from services.router.policies import POLICIES  # light: the router's policy names
from services.router.tool_calls import FORMATS  # light: the tool-call formats' names

STARTUP_TIMEOUT_S = 600.0
STOP_GRACE_S = 10.0
RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # after the nth death in a row
STABLE_S = 60.0  # up this long: the next death starts the backoff over


def add_up_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address the router listens on")
    add_cluster_arguments(parser)
    parser.add_argument("--log-dir", help="where component logs go (default: $PDMESH_HOME/logs/<time>)")


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """What `pdmesh up` and `pdmesh ray up` share: the model, the fleet, the workers' engine and the router."""
    parser.add_argument(
        "--model", help="local Hugging Face checkpoint directory (default: the embedded tiny model)"
    )
    parser.add_argument("--port", type=int, default=8000, help="router port (default 8000)")
    parser.add_argument("--mode", choices=["pd", "colocated"], default="pd")
    parser.add_argument("--prefill", type=int, default=1, help="prefill workers (pd mode)")
    parser.add_argument("--decode", type=int, default=1, help="decode workers (pd mode)")
    parser.add_argument("--colocated", type=int, default=1, help="colocated workers (colocated mode)")
    parser.add_argument(
        "--device", default="auto", help="auto, cpu, cuda; workers on GPUs take one each in turn"
    )
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, help="KV blocks per worker (default: sized from memory)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument(
        "--transfer-protocol",
        default="auto",
        choices=["auto", "tcp", "rdma", "nvlink_intra"],
        help="KV transport between prefill and decode workers (auto: nvlink_intra between GPUs, else tcp)",
    )
    parser.add_argument(
        "--kv-checksum", action="store_true", help="verify every KV transfer end to end (debug)"
    )
    parser.add_argument(
        "--load-format", default="safetensors", choices=["safetensors", "dummy"], help="dummy: random weights"
    )
    parser.add_argument(
        "--policy",
        default="kv_aware",
        choices=POLICIES,
        help="how the router picks workers",
    )
    parser.add_argument(
        "--tool-call-parser",
        default="auto",
        choices=FORMATS,
        help="how the router reads tool calls (default auto: from the chat template)",
    )
    parser.add_argument(
        "--routers",
        type=int,
        default=1,
        help="router replicas sharing the port (each its own process with its own view of the fleet)",
    )
    parser.add_argument("--api-key", help="require this API key at the router")


def cluster_roles(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(role, workers) of the fleet `args` asks for; ValueError when it cannot serve."""
    if args.routers < 1:
        raise ValueError("--routers must be at least 1")
    if args.mode == "colocated":
        roles = [("colocated", args.colocated)]
    else:
        roles = [("prefill", args.prefill), ("decode", args.decode)]
    for role, count in roles:
        if count < 1:
            raise ValueError(f"--{role} must be at least 1 in {args.mode} mode")
    return roles


def worker_argv(args: argparse.Namespace, model: str) -> list[str]:
    """The options every worker of the fleet gets (each adds its own role, address and device)."""
    argv = ["--model", model, "--dtype", args.dtype, "--block-size", str(args.block_size)]
    argv += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    argv += ["--max-num-seqs", str(args.max_num_seqs), "--transfer-protocol", args.transfer_protocol]
    argv += ["--load-format", args.load_format]
    if args.num_blocks:
        argv += ["--num-blocks", str(args.num_blocks)]
    return argv


def router_argv(args: argparse.Namespace, model: str) -> list[str]:
    """The options every router replica gets (each adds where it listens and where its workers are)."""
    argv = ["--model", model, "--policy", args.policy, "--tool-call-parser", args.tool_call_parser]
    if args.kv_checksum:
        argv.append("--kv-checksum")
    if args.api_key:
        argv += ["--api-key", args.api_key]
    return argv


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Component:
    name: str
    argv: list[str]
    log: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    started: float
    deaths: int = 0  # in a row, without a stable run between
    restart_at: float | None = None  # set while it waits out its backoff


class Cluster:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.components: list[Component] = []

    def _spawn(self, argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(log, "ab") as f:
            return subprocess.Popen(
                [sys.executable, "-m", "services.cli", *argv],
                stdout=f,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            )

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = self.log_dir / f"{name}.log"
        log.write_bytes(b"")
        proc = self._spawn(argv, log, env or {})
        self.components.append(Component(name, argv, log, env or {}, proc, time.monotonic()))

    def dead(self) -> Component | None:
        return next((c for c in self.components if c.restart_at is None and c.proc.poll() is not None), None)

    def supervise(self) -> None:
        """Restart components that died, each after its backoff (call repeatedly once the cluster is ready)."""
        now = time.monotonic()
        for c in self.components:
            if c.restart_at is None and c.proc.poll() is not None:
                c.deaths = 1 if now - c.started > STABLE_S else c.deaths + 1
                wait = RESTART_BACKOFF_S[min(c.deaths, len(RESTART_BACKOFF_S)) - 1]
                c.restart_at = now + wait
                print(
                    f"pdmesh: {c.name} exited with code {c.proc.returncode}; restarting it in {wait:.0f}s "
                    f"(log: {c.log})",
                    file=sys.stderr,
                    flush=True,
                )
            elif c.restart_at is not None and now >= c.restart_at:
                with open(c.log, "ab") as f:
                    f.write(f"\n--- pdmesh: restarted after exit code {c.proc.returncode} ---\n".encode())
                c.proc, c.started, c.restart_at = self._spawn(c.argv, c.log, c.env), now, None
                print(f"pdmesh: {c.name} restarted", file=sys.stderr, flush=True)

    def stop(self) -> None:
        procs = [c.proc for c in self.components]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _health(url: str) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _gpu_count(device: str) -> int:
    if device not in ("auto", "cuda"):
        return 0
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def run_cluster(args: argparse.Namespace) -> int:
    from services.engine.tiny_model import default_model_dir

    model = str(Path(args.model).resolve()) if args.model else str(default_model_dir())
    home = Path(os.environ.get("PDMESH_HOME", Path.home() / ".cache" / "pdmesh"))
    log_dir = Path(args.log_dir) if args.log_dir else home / "logs" / time.strftime("%Y%m%d-%H%M%S")
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        roles = cluster_roles(args)
    except ValueError as e:
        print(f"pdmesh up: error: {e}", file=sys.stderr)
        return 2
    gpus = _gpu_count(args.device)
    common = [*worker_argv(args, model), "--host", "127.0.0.1"]
    cluster = Cluster(log_dir)
    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    addresses: dict[str, list[str]] = {}
    total = sum(count for _, count in roles)
    # workers sharing a GPU split its memory between them
    share = f"{0.9 / -(-total // gpus):.3f}" if gpus else "0.9"
    index = 0
    for role, count in roles:
        for i in range(count):
            port = free_port()
            device = f"cuda:{index % gpus}" if gpus else ("cpu" if args.device == "auto" else args.device)
            argv = [role, *common, "--port", str(port), "--device", device, "--gpu-memory-utilization", share]
            cluster.start(f"{role}-{i}", argv)
            addresses.setdefault(role, []).append(f"127.0.0.1:{port}")
            index += 1
    router_args = ["router", *router_argv(args, model), "--host", args.host, "--port", str(args.port)]
    for role, addrs in addresses.items():
        router_args += [f"--{role}", ",".join(addrs)]
    if args.routers == 1:
        cluster.start("router", router_args)
    else:  # replicas on one port: the kernel spreads connections over them (SO_REUSEPORT)
        for i in range(args.routers):
            cluster.start(f"router-{i}", [*router_args, "--reuse-port"])

    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    workers = ", ".join(f"{len(a)} {r}" for r, a in addresses.items())
    routers = "a router" if args.routers == 1 else f"{args.routers} router replicas"
    print(f"pdmesh: starting {workers} worker(s) and {routers} on {url} (logs: {log_dir})", flush=True)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    ready = False
    try:
        while not stop_requested:
            if ready:
                cluster.supervise()
            elif dead := cluster.dead():
                print(
                    f"pdmesh: {dead.name} exited with code {dead.proc.returncode}; its last log lines:\n"
                    f"{_tail(dead.log)}",
                    file=sys.stderr,
                )
                return 1
            if not ready:
                health = _health(url)
                if health and health.get("status") == "ok":
                    ready = True
                    _print_ready(url, Path(model).name, args.api_key)
                elif time.monotonic() > deadline:
                    print(
                        f"pdmesh: the cluster did not become ready in {STARTUP_TIMEOUT_S:.0f}s; see {log_dir}",
                        file=sys.stderr,
                    )
                    return 1
            time.sleep(0.2)
        print("pdmesh: stopping", flush=True)
        return 0
    finally:
        cluster.stop()


def _print_ready(url: str, model: str, api_key: str | None) -> None:
    auth = f' -H "Authorization: Bearer {api_key}"' if api_key else ""
    print(
        f"pdmesh: ready at {url}  (model '{model}'; Ctrl-C stops everything)\n\n"
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
        f'    -d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}], '
        f'"max_tokens": 32}}\'\n',
        flush=True,
    )
