"""The two kinds of actor a deployment is made of.

- `WorkerActor` runs one worker (`pdmesh prefill|decode|colocated`) as its child process, on a port the worker
  picks itself (so workers sharing a node never collide), with the GPUs Ray gave the actor. The child dies with
  the actor (killed or not); when the child exits on its own, the actor exits too and Ray restarts it (on the
  node of its placement group), which starts a fresh worker the routers pick up.
- `RouterActor` runs a router replica in the actor's own process, on the shared HTTP port (SO_REUSEPORT), with
  Ray discovery of the deployment's workers and its metrics mirrored into Ray's.

Their output (the worker's log included) is the actor's log, which the Ray dashboard shows.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import ray

from services.common.lifetime import die_with_parent
from services.router.app import REPLICA, RouterConfig, create_app
from services.router.server import reuse_port_socket

log = logging.getLogger("pdmesh.ray")
STOP_GRACE_S = 15.0  # beyond the drain, before a worker process is killed


def _exit_for_restart(what: str) -> None:
    print(f"pdmesh: {what}; the actor exits so that Ray restarts it", file=sys.stderr, flush=True)
    os._exit(1)


class WorkerActor:
    def __init__(self, role: str, argv: list[str]) -> None:
        self.role = role
        # one folder per actor name, emptied on every (re)start: a killed actor's leftovers do not pile up
        context = ray.get_runtime_context()
        name = context.get_actor_name() or f"{role}-{os.getpid()}"
        self._dir = Path(tempfile.gettempdir()) / "pdmesh-ray" / context.namespace / name
        shutil.rmtree(self._dir, ignore_errors=True)
        self._dir.mkdir(parents=True)
        self._address_file = self._dir / "address"
        self._node_ip = ray.util.get_node_ip_address()
        self._command = [
            *(sys.executable, "-m", "services.cli", role, *argv),
            *("--host", self._node_ip, "--port", "0", "--address-file", str(self._address_file)),
        ]
        self._stopping = threading.Event()
        self._spawned = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        # NOTE: the kernel kills the child when the thread that started it ends, so a thread that lives as long
        # as the child starts it
        threading.Thread(target=self._supervise, name="worker-process", daemon=True).start()
        self._spawned.wait()

    def _supervise(self) -> None:
        parent = os.getpid()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if order := _gpu_order():
            env["CUDA_VISIBLE_DEVICES"] = order
        self._proc = subprocess.Popen(self._command, env=env, preexec_fn=lambda: die_with_parent(parent))
        self._spawned.set()
        code = self._proc.wait()
        if not self._stopping.is_set():
            _exit_for_restart(f"the {self.role} worker process exited with code {code}")

    def info(self) -> dict[str, Any]:
        """Where the worker serves (None while it starts) and what it runs on."""
        address = self._address_file.read_text() if self._address_file.exists() else None
        return {
            "role": self.role,
            "address": address,
            "node_ip": self._node_ip,
            "pid": self._proc.pid if self._proc else None,
            "actor_pid": os.getpid(),
            "gpus": [str(g) for g in ray.get_gpu_ids()],
        }

    def stop(self, drain_s: float) -> int | None:
        """Drain and stop the worker (SIGTERM: requests under way finish, new ones are refused)."""
        self._stopping.set()
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=drain_s + STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)
        return proc.returncode


def _gpu_order() -> str | None:
    """CUDA_VISIBLE_DEVICES for the worker: its own GPUs first (its ranks take cuda:0, cuda:1, ...), then the node's
    other GPUs. Ray shows an actor only its own, but KV moved GPU to GPU between workers of a node (nvlink_intra,
    CUDA IPC) maps a peer's memory, which only works from a process that sees the peer's GPU."""
    mine = [str(g) for g in ray.get_gpu_ids()]
    if not mine:
        return None
    node = ray.get_runtime_context().get_node_id()
    total = next((int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n["NodeID"] == node), 0)
    if not all(
        g.isdigit() and int(g) < total for g in mine
    ):  # the node restricts its GPUs itself: keep Ray's
        return ",".join(mine)
    return ",".join([*mine, *(str(i) for i in range(total) if str(i) not in mine)])


def _loop_factory() -> Any:
    try:
        import uvloop

        return uvloop.new_event_loop
    except ImportError:
        return asyncio.new_event_loop


class RouterActor:
    def __init__(self, config: RouterConfig, host: str, port: int, log_level: str = "warning") -> None:
        import uvicorn

        from services.raycluster.bridge import RegistryBridge

        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        app = create_app(config)  # a configuration error fails the actor's creation, with the reason
        self._router = app.state.router
        self._port = port
        self._server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
        )
        self._socket = reuse_port_socket(host, port)
        self._bridge = RegistryBridge(self._router.metrics.registry)
        self._bridge.start()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="router", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                runner.run(self._server.serve(sockets=[self._socket]))
        except BaseException as e:
            log.exception("the router stopped: %s", e)
        if not self._stopping.is_set():
            _exit_for_restart("the router stopped serving")

    def info(self) -> dict[str, Any]:
        r = self._router
        return {
            "role": "router",
            "replica": REPLICA,
            "node_ip": ray.util.get_node_ip_address(),
            "port": self._port,
            "ready": bool(r.ready),
            "error": r.startup_error,
            "workers": self._usable_workers(),
        }

    def _usable_workers(self) -> dict[str, list[str]]:
        pool = self._router.pool
        for _ in range(
            3
        ):  # NOTE: read from another thread than the router's; a membership change may interleave
            try:
                return {
                    role: sorted(w.address for w in pool.of_role(role) if w.usable) for role in pool.roles
                }
            except RuntimeError:
                continue
        return {}

    def stop(self) -> None:
        self._stopping.set()
        self._bridge.stop()
        self._server.should_exit = True
        self._thread.join(timeout=STOP_GRACE_S)
