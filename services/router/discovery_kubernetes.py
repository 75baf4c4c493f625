"""Worker discovery through the Kubernetes API.

`watch_pods` lists the pods that a label selector picks in one namespace, then watches them, and yields the workers
by role whenever that set changes. A pod's role comes from a label (`pdmesh.io/role`: prefill, decode or colocated)
and its address is its pod IP with the workers' gRPC port. Only pods that are Running, Ready, have an IP and are not
terminating count: a worker joins once its readiness probe passes and leaves as soon as its deletion starts.

The router's service account needs RBAC `get`, `list` and `watch` on `pods` in that namespace (a Role with
`apiGroups: [""]`, `resources: ["pods"]`, `verbs: ["get", "list", "watch"]` and a RoleBinding to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator

import lightkube
from lightkube import operators
from lightkube.resources.core_v1 import Pod

from services.router.workers import ROLES

log = logging.getLogger("pdmesh.router")
# the server ends a watch after WATCH_S and lightkube opens the next one itself; independently, every
# WATCH_S + WATCH_SLACK_S a fresh watch is opened from the last version seen, since a watch has no read timeout
# and a half-open connection would otherwise stall it for good
WATCH_S = 300
WATCH_SLACK_S = 15.0
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0
# a list-and-watch that fails within this long continues the failure streak (no new warning, longer backoff)
STABLE_S = 30.0

_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"
_TERM = re.compile(
    rf"(?P<neg>!)?\s*(?P<key>(?:[a-z0-9](?:[-a-z0-9.]*[a-z0-9])?/)?{_NAME})"
    rf"(?:\s*(?P<op>!=|==|=)\s*(?P<value>(?:{_NAME})?))?"
)

Snapshot = dict[str, set[str]]
Labels = dict[str, str | operators.Operator | None]  # lightkube's form of a label selector


def parse_selector(selector: str) -> Labels:
    """A label selector string as lightkube's labels; the empty selector picks every pod of the namespace."""
    labels: Labels = {}
    for term in selector.split(",") if selector.strip() else ():
        m = _TERM.fullmatch(term.strip())
        if m is None or (m["neg"] and m["op"]) or m["key"] in labels:
            raise ValueError(
                f"unsupported label selector term {term.strip()!r} in {selector!r}: expected comma-separated "
                "`key`, `!key`, `key=value` or `key!=value` terms, each key at most once"
            )
        if m["op"] is None:
            labels[m["key"]] = operators.not_exists() if m["neg"] else None
        else:
            labels[m["key"]] = operators.not_equal(m["value"]) if m["op"] == "!=" else m["value"]
    return labels


def _address(pod: Pod, port: int) -> str | None:
    """host:port of a pod that can serve now, else None."""
    status = pod.status
    if pod.metadata.deletionTimestamp is not None or status is None or status.phase != "Running":
        return None
    if not status.podIP or not any(c.type == "Ready" and c.status == "True" for c in status.conditions or ()):
        return None
    return f"[{status.podIP}]:{port}" if ":" in status.podIP else f"{status.podIP}:{port}"


class _Workers:
    """The pods that count now, by name, as seen through list and watch events."""

    def __init__(self, namespace: str, port: int, role_label: str) -> None:
        self.namespace, self.port, self.role_label = namespace, port, role_label
        self.members: dict[str, tuple[str, str]] = {}  # pod name -> (role, address)
        self.warned: set[str] = set()  # pods already reported for their role label

    def reset(self, pods: list[Pod]) -> None:
        """The state after a fresh list; pods that went away meanwhile are forgotten."""
        self.members.clear()
        self.warned &= {pod.metadata.name for pod in pods}
        for pod in pods:
            self.apply("ADDED", pod)

    def apply(self, kind: str, pod: Pod) -> None:
        name = pod.metadata.name
        self.members.pop(name, None)
        if kind == "DELETED":
            self.warned.discard(name)
            return
        role = (pod.metadata.labels or {}).get(self.role_label)
        if role not in ROLES:
            if name not in self.warned:
                self.warned.add(name)
                found = "missing" if role is None else f"{role!r}"
                log.warning(
                    "pod %s/%s skipped: its %s label is %s, not one of %s",
                    self.namespace,
                    name,
                    self.role_label,
                    found,
                    ", ".join(ROLES),
                )
            return
        if (address := _address(pod, self.port)) is not None:
            self.members[name] = (role, address)

    def snapshot(self) -> Snapshot:
        snap: Snapshot = {role: set() for role in ROLES}
        for role, address in self.members.values():
            snap[role].add(address)
        return snap


async def _next_event(stream: AsyncIterator[tuple[str, Pod]], deadline: float) -> tuple[str, Pod] | None:
    """The watch's next event, or None once the deadline passes. No yield happens under the timeout, so it can
    never cancel the generator's consumer."""
    try:
        async with asyncio.timeout_at(deadline):
            return await anext(stream, None)
    except TimeoutError:
        return None


async def _list_then_watch(
    kube: lightkube.AsyncClient, namespace: str, labels: Labels, workers: _Workers
) -> AsyncIterator[Snapshot]:
    """The snapshot after a fresh list, then after each watch event; ends only by raising."""
    listing = kube.list(Pod, namespace=namespace, labels=labels)
    workers.reset([pod async for pod in listing])
    version = listing.resourceVersion
    yield workers.snapshot()
    loop = asyncio.get_running_loop()
    while True:  # one watch per pass, each from the last version seen
        deadline = loop.time() + WATCH_S + WATCH_SLACK_S
        stream = kube.watch(
            Pod, namespace=namespace, labels=labels, resource_version=version, server_timeout=WATCH_S
        )
        async with contextlib.aclosing(stream):
            while (event := await _next_event(stream, deadline)) is not None:
                kind, pod = event
                version = pod.metadata.resourceVersion or version
                if kind in ("ADDED", "MODIFIED", "DELETED"):  # a BOOKMARK only moves the version on
                    workers.apply(kind, pod)
                yield workers.snapshot()


async def watch_pods(
    namespace: str | None,
    selector: str,
    port: int,
    role_label: str = "pdmesh.io/role",
    client: lightkube.AsyncClient | None = None,
) -> AsyncIterator[Snapshot]:
    """Yield `{"prefill": {...}, "decode": {...}, "colocated": {...}}` (addresses `ip:port`, all three keys always
    there) after the first list, then whenever the set changes. On any failure it lists again, with backoff; it
    ends only when closed or cancelled. A client made here (from the in-cluster service account or KUBECONFIG) is
    closed on exit. namespace None is the client's own: the service account's in a pod, else the kubeconfig
    context's. A bad selector raises ValueError on the first iteration."""
    labels = parse_selector(selector)
    kube = lightkube.AsyncClient() if client is None else client
    namespace = namespace or kube.namespace
    workers = _Workers(namespace, port, role_label)
    last: Snapshot | None = None
    loop = asyncio.get_running_loop()
    delay, failing, recovered = BACKOFF_MIN_S, False, False
    try:
        while True:
            started = loop.time()
            try:
                async with contextlib.aclosing(_list_then_watch(kube, namespace, labels, workers)) as snaps:
                    async for snap in snaps:
                        if failing and not recovered:
                            log.info("kubernetes pods in %s listed again after failures", namespace)
                            recovered = True
                        if snap != last:
                            last = snap
                            # a copy: the caller may change what it gets
                            yield {role: set(snap[role]) for role in ROLES}
            except Exception as e:  # an expired version (410), a lost connection, a refusal: list again
                if loop.time() - started >= STABLE_S:
                    failing = False
                if not failing:
                    log.warning(
                        "kubernetes pod watch in %s failed, listing again with backoff: %s: %s",
                        namespace,
                        type(e).__name__,
                        e,
                    )
                    delay, failing, recovered = BACKOFF_MIN_S, True, False
                await asyncio.sleep(delay)
                delay = min(2 * delay, BACKOFF_MAX_S)
    finally:
        if client is None:
            await kube.close()
