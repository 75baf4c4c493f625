"""A local stand-in for the Kubernetes API server's pod endpoints, for tests (no real API server can run here).

It serves the real API's JSON over HTTP: `GET /api/v1/namespaces/{ns}/pods` gives a PodList (`labelSelector` takes
`key`, `!key`, `key=value`, `key==value`, `key!=value`); with `watch=true` it streams newline-delimited watch events
after `resourceVersion` (a 410 Expired Status event when that is older than the kept history) until
`timeoutSeconds`. It runs on its own event loop in a thread; tests change the pods from theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import re
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

Pod = dict[str, Any]
_TERM = re.compile(r"(!?)([-A-Za-z0-9_./]+)(?:(!=|==|=)([-A-Za-z0-9_.]*))?")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(**fields: Any) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", **fields}


def _line(kind: str, obj: dict[str, Any]) -> str:
    return json.dumps({"type": kind, "object": obj}) + "\n"


def label_matcher(selector: str) -> Callable[[dict[str, str]], bool]:
    """A predicate on a pod's labels; ValueError for a term of another form."""
    terms = []
    for term in filter(None, (t.strip() for t in selector.split(","))):
        m = _TERM.fullmatch(term)
        if m is None or (m[1] and m[3]):
            raise ValueError(f"unable to parse requirement: {term!r}")
        terms.append(m.groups())
    return lambda labels: all(
        (key in labels if op is None else (labels.get(key) == value) == (op != "!=")) != bool(neg)
        for neg, key, op, value in terms
    )


class FakeApiServer:
    """Pods in memory with an etcd-like resourceVersion counter and change history, served over HTTP."""

    def __init__(self, role_label: str = "pdmesh.io/role", token: str = "test-token") -> None:
        self.role_label, self.token = role_label, token
        self.port = 0
        self.requests: list[str] = []  # "path?query" of each request served
        self.expired = 0  # watches answered with 410
        self._lock = threading.Lock()  # guards the state below, shared by the test's thread and the server's
        self._pods: dict[str, Pod] = {}  # a pod dict is never changed once committed: changes commit a copy
        self._history: list[tuple[int, str, Pod]] = []  # (resourceVersion, event type, pod), ascending
        self._version = self._floor = 100  # a watch from below _floor gets 410
        self._stalled: int | None = None  # while set, watches deliver nothing past this version
        self._epoch = 0  # bumped to end every open watch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed = asyncio.Event()  # set, and replaced, on the server's loop after each change
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeApiServer:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))  # a restart takes the same port again
        self.port = sock.getsockname()[1]
        app = Starlette(routes=[Route("/api/v1/namespaces/{ns}/pods", self._endpoint)])
        config = uvicorn.Config(
            app, loop="asyncio", http="h11", lifespan="off", log_level="warning", timeout_graceful_shutdown=2
        )
        self._server = server = uvicorn.Server(config)
        self._loop = loop = asyncio.new_event_loop()
        self._changed = asyncio.Event()
        self._thread = threading.Thread(
            target=loop.run_until_complete, args=(server.serve([sock]),), daemon=True
        )
        self._thread.start()
        while not server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the stand-in API server did not start")
            threading.Event().wait(0.01)
        return self

    def stop(self) -> None:
        """Stop serving and reset open connections, as when an API server dies; the pods are kept."""
        server, thread, loop = self._server, self._thread, self._loop
        if server is None or thread is None or loop is None:
            return

        def abort() -> None:
            for conn in list(server.server_state.connections):
                conn.transport.abort()
            server.should_exit = True

        loop.call_soon_threadsafe(abort)
        thread.join(timeout=10)
        self._server = self._thread = self._loop = None
        loop.close()

    def add_pod(
        self,
        name: str,
        role: str | None,
        ip: str | None,
        ready: bool = True,
        labels: dict[str, str] | None = None,
        namespace: str = "default",
        phase: str = "Running",
    ) -> None:
        labels = {"app": "pdmesh", **({self.role_label: role} if role else {}), **(labels or {})}
        meta = {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()), "labels": labels}
        meta["creationTimestamp"] = _now()
        status: dict[str, Any] = {"phase": phase, "conditions": [{"type": "Ready", "status": str(ready)}]}
        if ip:
            status.update(podIP=ip, podIPs=[{"ip": ip}])
        spec = {"containers": [{"name": "worker", "image": "pdmesh:test"}]}
        pod = {"kind": "Pod", "apiVersion": "v1", "metadata": meta, "spec": spec, "status": status}
        self._commit("ADDED", pod)

    def set_ready(self, name: str, ready: bool) -> None:
        pod = self._copy(name)
        pod["status"]["conditions"] = [{"type": "Ready", "status": str(ready), "lastTransitionTime": _now()}]
        self._commit("MODIFIED", pod)

    def delete_pod(self, name: str, grace: bool = False) -> None:
        """Mark the pod terminating (deletionTimestamp) and, unless `grace`, remove it as the kubelet would."""
        pod = self._copy(name)
        pod["metadata"]["deletionTimestamp"] = _now()
        self._commit("MODIFIED", pod)
        if not grace:
            self._commit("DELETED", copy.deepcopy(pod))

    def compact(self) -> None:
        """Forget the history: a watch from any version older than now gets 410 Gone."""
        with self._lock:
            self._history.clear()
            self._floor = self._version

    @contextlib.contextmanager
    def watches_stalled(self) -> Iterator[None]:
        """Open watches deliver nothing inside the block and end after it, so their clients watch again from the
        last version they saw."""
        with self._lock:
            self._stalled = self._version
        try:
            yield
        finally:
            with self._lock:
                self._stalled = None
                self._epoch += 1
            self._wake()

    def _copy(self, name: str) -> Pod:
        with self._lock:
            return copy.deepcopy(self._pods[name])

    def _commit(self, kind: str, pod: Pod) -> None:
        with self._lock:
            self._version += 1
            pod["metadata"]["resourceVersion"] = str(self._version)
            if kind == "DELETED":
                del self._pods[pod["metadata"]["name"]]
            else:
                self._pods[pod["metadata"]["name"]] = pod
            self._history.append((self._version, kind, pod))
        self._wake()

    def _wake(self) -> None:
        def notify() -> None:
            self._changed.set()
            self._changed = asyncio.Event()

        with contextlib.suppress(AttributeError, RuntimeError):  # a stopped server has no watch to wake
            self._loop.call_soon_threadsafe(notify)  # type: ignore[union-attr]

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """A kubeconfig (JSON, which is YAML) with one context: plain http to this server, a bearer-token user."""
        context = {"cluster": "stand-in", "user": "router", "namespace": namespace}
        config = {
            "clusters": [{"name": "stand-in", "cluster": {"server": self.url}}],
            "users": [{"name": "router", "user": {"token": self.token}}],
            "contexts": [{"name": "stand-in", "context": context}],
            "current-context": "stand-in",
        }
        path.write_text(json.dumps({"apiVersion": "v1", "kind": "Config", **config}, indent=2))
        return path

    async def _endpoint(self, request: Request) -> Response:
        self.requests.append(f"{request.url.path}?{request.url.query}")
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return JSONResponse(
                _status(code=401, reason="Unauthorized", message="Unauthorized"), status_code=401
            )
        ns, q = request.path_params["ns"], request.query_params
        try:
            match = label_matcher(q.get("labelSelector", ""))
        except ValueError as e:
            return JSONResponse(_status(code=400, reason="BadRequest", message=str(e)), status_code=400)

        def selected(pod: Pod) -> bool:
            return pod["metadata"]["namespace"] == ns and match(pod["metadata"]["labels"])

        if q.get("watch") in ("true", "1"):
            since = q.get("resourceVersion")
            timeout = float(q["timeoutSeconds"]) if q.get("timeoutSeconds") else None
            events = self._watch(selected, int(since) if since not in (None, "", "0") else None, timeout)
            return StreamingResponse(events, media_type="application/json")
        with self._lock:  # list items carry no kind/apiVersion, as the real API's
            items = [
                {k: v for k, v in p.items() if k not in ("kind", "apiVersion")} for p in self._pods.values()
            ]
            version = str(self._version)
        meta = {"resourceVersion": version}
        return JSONResponse(
            {"kind": "PodList", "apiVersion": "v1", "metadata": meta, "items": list(filter(selected, items))}
        )

    async def _watch(
        self, selected: Callable[[Pod], bool], since: int | None, timeout: float | None
    ) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout is not None else 1e6)
        with self._lock:
            epoch = self._epoch
            initial = [] if since is not None else [p for p in self._pods.values() if selected(p)]
            since = self._version if since is None else since
        for pod in initial:  # no version given: the current pods first, as ADDED events
            yield _line("ADDED", pod)
        while loop.time() < deadline:
            changed = self._changed  # taken before reading the history, so no change is missed
            with self._lock:
                ended, expired = self._epoch != epoch, since < self._floor
                limit = self._version if self._stalled is None else self._stalled
                batch = [(v, kind, pod) for v, kind, pod in self._history if since < v <= limit]
                floor = self._floor
            if ended:
                return
            if expired:
                self.expired += 1
                yield _line(
                    "ERROR",
                    _status(
                        code=410, reason="Expired", message=f"too old resource version: {since} ({floor})"
                    ),
                )
                return
            for v, kind, pod in batch:
                since = v
                if selected(pod):
                    yield _line(kind, pod)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), deadline - loop.time())
