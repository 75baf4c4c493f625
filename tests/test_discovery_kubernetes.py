"""`watch_pods` against a stand-in Kubernetes API server, reached over real HTTP by lightkube."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import lightkube
import pytest
from lightkube import KubeConfig

from services.router import discovery_kubernetes
from services.router.discovery_kubernetes import Snapshot, parse_selector, watch_pods
from tests.k8s_apiserver import FakeApiServer

PORT = 50051
SELECTOR = "app=pdmesh,tier!=canary"


@pytest.fixture
def apiserver() -> Iterator[FakeApiServer]:
    server = FakeApiServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def kubeconfig(apiserver: FakeApiServer, tmp_path: Path) -> Path:
    return apiserver.write_kubeconfig(tmp_path / "kubeconfig")


def addrs(*ips: str) -> set[str]:
    return {f"{ip}:{PORT}" for ip in ips}


class Watcher:
    """Consumes watch_pods in a task, as the router does, keeping every snapshot in order."""

    def __init__(self, pods: AsyncIterator[Snapshot]) -> None:
        self.pods = pods
        self.snaps: asyncio.Queue[Snapshot] = asyncio.Queue()
        self.task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        async for snap in self.pods:
            self.snaps.put_nowait(snap)

    async def until(self, ok: Callable[[Snapshot], bool], timeout: float) -> Snapshot:
        """The first snapshot satisfying ok, within timeout seconds."""
        async with asyncio.timeout(timeout):
            while not ok(snap := await self.snaps.get()):
                pass
        return snap

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        assert self.task.cancelled(), "watch_pods ended on its own"


def run(kubeconfig: Path, scenario: Callable[[Watcher], Awaitable[None]]) -> None:
    async def main() -> None:
        async with lightkube.AsyncClient(config=KubeConfig.from_file(kubeconfig)) as client:
            watcher = Watcher(watch_pods("default", SELECTOR, PORT, client=client))
            try:
                await scenario(watcher)
            finally:
                await watcher.close()

    asyncio.run(main())


def test_initial_snapshot_only_serving_pods(apiserver: FakeApiServer, kubeconfig: Path, monkeypatch) -> None:
    apiserver.add_pod("p0", "prefill", "10.0.0.1")
    apiserver.add_pod("p1", "prefill", "10.0.0.2")
    apiserver.add_pod("d0", "decode", "10.0.1.1")
    apiserver.add_pod("c0", "colocated", "10.0.2.1")
    apiserver.add_pod("unready", "decode", "10.0.1.2", ready=False)
    apiserver.add_pod("pending", "decode", "10.0.1.3", phase="Pending")
    apiserver.add_pod("no-ip", "decode", None)
    apiserver.add_pod("terminating", "decode", "10.0.1.4")
    apiserver.delete_pod("terminating", grace=True)
    apiserver.add_pod("other-app", "decode", "10.0.9.1", labels={"app": "other"})
    apiserver.add_pod("canary", "decode", "10.0.9.2", labels={"tier": "canary"})
    apiserver.add_pod("elsewhere", "decode", "10.0.9.3", namespace="other")
    # no client given: made from KUBECONFIG, as in a router outside the cluster
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))

    async def main() -> None:
        pods = watch_pods("default", SELECTOR, PORT)
        try:
            snap = await asyncio.wait_for(anext(pods), 5)
        finally:
            await pods.aclose()  # type: ignore[attr-defined]
        assert snap == {
            "prefill": addrs("10.0.0.1", "10.0.0.2"),
            "decode": addrs("10.0.1.1"),
            "colocated": addrs("10.0.2.1"),
        }

    asyncio.run(main())
    listed = [r for r in apiserver.requests if "watch" not in r]
    assert listed and "labelSelector=app%3Dpdmesh%2Ctier%21%3Dcanary" in listed[0]


def test_no_namespace_is_the_kubeconfig_contexts(apiserver: FakeApiServer, tmp_path: Path) -> None:
    apiserver.add_pod("d0", "decode", "10.0.1.1")
    apiserver.add_pod("d1", "decode", "10.0.1.2", namespace="team-a")
    config = KubeConfig.from_file(apiserver.write_kubeconfig(tmp_path / "kubeconfig", namespace="team-a"))

    async def main() -> Snapshot:
        async with lightkube.AsyncClient(config=config) as client:
            pods = watch_pods(None, SELECTOR, PORT, client=client)
            try:
                return await asyncio.wait_for(anext(pods), 5)
            finally:
                await pods.aclose()  # type: ignore[attr-defined]

    assert asyncio.run(main())["decode"] == addrs("10.0.1.2")


def test_role_label_missing_or_unknown_is_skipped_with_one_warning(
    apiserver: FakeApiServer, kubeconfig: Path, caplog: pytest.LogCaptureFixture
) -> None:
    apiserver.add_pod("d0", "decode", "10.0.1.1")
    apiserver.add_pod("norole", None, "10.0.3.1")
    apiserver.add_pod("router", "router", "10.0.3.2")

    async def scenario(w: Watcher) -> None:
        assert await w.snaps.get() == {"prefill": set(), "decode": addrs("10.0.1.1"), "colocated": set()}
        apiserver.set_ready("norole", False)
        apiserver.set_ready("router", False)
        apiserver.add_pod("d1", "decode", "10.0.1.2")
        await w.until(lambda s: s["decode"] == addrs("10.0.1.1", "10.0.1.2"), 2)

    with caplog.at_level(logging.WARNING, logger="pdmesh.router"):
        run(kubeconfig, scenario)
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 2 and any("norole" in m for m in skipped) and any("router" in m for m in skipped)


def test_pods_joining_and_leaving_are_seen_within_2s(apiserver: FakeApiServer, kubeconfig: Path) -> None:
    apiserver.add_pod("p0", "prefill", "10.0.0.1")
    apiserver.add_pod("d0", "decode", "10.0.1.1")
    apiserver.add_pod("d1", "decode", "10.0.1.2")

    async def scenario(w: Watcher) -> None:
        await w.until(lambda s: s["decode"] == addrs("10.0.1.1", "10.0.1.2"), 5)
        apiserver.add_pod("p1", "prefill", "10.0.0.2", ready=False)  # not ready yet: no snapshot change
        apiserver.add_pod("c0", "colocated", "10.0.2.1")
        snap = await w.until(lambda s: s["colocated"] == addrs("10.0.2.1"), 2)
        assert snap["prefill"] == addrs("10.0.0.1")
        apiserver.set_ready("p1", True)
        await w.until(lambda s: s["prefill"] == addrs("10.0.0.1", "10.0.0.2"), 2)
        apiserver.set_ready("d0", False)
        await w.until(lambda s: s["decode"] == addrs("10.0.1.2"), 2)
        apiserver.delete_pod("d1", grace=True)  # terminating, still Ready: leaves at once
        await w.until(lambda s: s["decode"] == set(), 2)
        apiserver.delete_pod("p0")
        snap = await w.until(lambda s: s["prefill"] == addrs("10.0.0.2"), 2)
        assert snap == {"prefill": addrs("10.0.0.2"), "decode": set(), "colocated": addrs("10.0.2.1")}

    run(kubeconfig, scenario)
    watches = [r for r in apiserver.requests if "watch=true" in r]
    assert watches and "resourceVersion=" in watches[0]


def test_every_yield_is_a_change(apiserver: FakeApiServer, kubeconfig: Path) -> None:
    apiserver.add_pod("d0", "decode", "10.0.1.1")

    async def scenario(w: Watcher) -> None:
        first = await w.snaps.get()
        apiserver.add_pod("other-app", "decode", "10.0.9.1", labels={"app": "other"})
        apiserver.add_pod("d1", "decode", "10.0.1.2", ready=False)
        apiserver.set_ready("d1", False)
        apiserver.add_pod("d2", "decode", "10.0.1.3")
        second = await asyncio.wait_for(w.snaps.get(), 2)
        assert first["decode"] == addrs("10.0.1.1") and second["decode"] == addrs("10.0.1.1", "10.0.1.3")

    run(kubeconfig, scenario)


def test_expired_history_is_recovered_by_listing_again(
    apiserver: FakeApiServer, kubeconfig: Path, caplog: pytest.LogCaptureFixture
) -> None:
    apiserver.add_pod("d0", "decode", "10.0.1.1")
    apiserver.add_pod("d1", "decode", "10.0.1.2")

    async def scenario(w: Watcher) -> None:
        await w.snaps.get()
        await asyncio.sleep(0.3)  # the watch is open
        # changes the open watch never gets, then a history that no longer has them
        with apiserver.watches_stalled():
            apiserver.set_ready("d0", False)
            apiserver.add_pod("p0", "prefill", "10.0.0.1")
            apiserver.compact()
        snap = await w.until(lambda s: bool(s["prefill"]), 5)
        assert snap == {"prefill": addrs("10.0.0.1"), "decode": addrs("10.0.1.2"), "colocated": set()}
        apiserver.add_pod("c0", "colocated", "10.0.2.1")  # and the new watch works
        await w.until(lambda s: s["colocated"] == addrs("10.0.2.1"), 2)

    with caplog.at_level(logging.INFO, logger="pdmesh.router"):
        run(kubeconfig, scenario)
    assert apiserver.expired == 1
    assert sum("too old resource version" in r.getMessage() for r in caplog.records) == 1


def test_server_restart_is_recovered_with_one_warning(
    apiserver: FakeApiServer, kubeconfig: Path, caplog: pytest.LogCaptureFixture
) -> None:
    apiserver.add_pod("d0", "decode", "10.0.1.1")

    async def scenario(w: Watcher) -> None:
        await w.snaps.get()
        await asyncio.sleep(0.3)
        await asyncio.to_thread(apiserver.stop)  # the open watch is reset
        apiserver.add_pod("d1", "decode", "10.0.1.2")
        apiserver.delete_pod("d0")
        await asyncio.sleep(1.0)  # several failed attempts in one streak
        await asyncio.to_thread(apiserver.start)
        snap = await w.until(lambda s: s["decode"] == addrs("10.0.1.2"), 5)
        assert snap == {"prefill": set(), "decode": addrs("10.0.1.2"), "colocated": set()}
        apiserver.add_pod("p0", "prefill", "10.0.0.1")
        await w.until(lambda s: s["prefill"] == addrs("10.0.0.1"), 2)

    with caplog.at_level(logging.INFO, logger="pdmesh.router"):
        run(kubeconfig, scenario)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("failed" in m for m in messages) == 1, messages
    assert sum("listed again after failures" in m for m in messages) == 1, messages


def test_watches_are_renewed_without_listing_again(
    apiserver: FakeApiServer,
    kubeconfig: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(discovery_kubernetes, "WATCH_S", 1)
    monkeypatch.setattr(discovery_kubernetes, "WATCH_SLACK_S", 0.2)
    apiserver.add_pod("d0", "decode", "10.0.1.1")

    async def scenario(w: Watcher) -> None:
        await w.snaps.get()
        await asyncio.sleep(0.6)
        apiserver.add_pod("d1", "decode", "10.0.1.2")
        await w.until(lambda s: s["decode"] == addrs("10.0.1.1", "10.0.1.2"), 2)
        await asyncio.sleep(1.0)  # past the first watch's deadline
        apiserver.delete_pod("d0")
        await w.until(lambda s: s["decode"] == addrs("10.0.1.2"), 2)

    with caplog.at_level(logging.INFO, logger="pdmesh.router"):
        run(kubeconfig, scenario)
    assert not [r for r in caplog.records if r.name == "pdmesh.router"]
    lists = [r for r in apiserver.requests if "watch" not in r]
    watches = [r for r in apiserver.requests if "watch=true" in r and "timeoutSeconds=1" in r]
    versions = {r.split("resourceVersion=")[1].split("&")[0] for r in watches}
    assert (
        len(lists) == 1 and len(watches) >= 2 and len(versions) >= 2
    )  # each watch from the last version seen


def test_refused_requests_are_retried_with_backoff(
    apiserver: FakeApiServer, kubeconfig: Path, caplog: pytest.LogCaptureFixture
) -> None:
    apiserver.add_pod("d0", "decode", "10.0.1.1")
    token, apiserver.token = apiserver.token, "rotated"  # the client's token is refused (401)

    async def scenario(w: Watcher) -> None:
        await asyncio.sleep(1.0)
        assert w.snaps.empty() and not w.task.done()
        assert 2 <= len(apiserver.requests) <= 4  # tries at 0, 0.2 and 0.6 s, then waits 0.8 s
        apiserver.token = token
        assert (await w.until(lambda s: True, 3))["decode"] == addrs("10.0.1.1")

    with caplog.at_level(logging.WARNING, logger="pdmesh.router"):
        run(kubeconfig, scenario)
    assert [r.getMessage() for r in caplog.records if "failed" in r.getMessage()] == [
        "kubernetes pod watch in default failed, listing again with backoff: ApiError: Unauthorized"
    ]


@pytest.mark.parametrize("bad", ["app in (a,b)", "app=a,", "=a", "!app=a", "app=a=b", "app=a,app=b", "a b"])
def test_bad_selector_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="key!=value"):
        parse_selector(bad)

    async def first() -> None:
        await anext(watch_pods("default", bad, PORT, client=object()))  # type: ignore[arg-type]

    with pytest.raises(ValueError, match="expected comma-separated"):
        asyncio.run(first())


def test_selector_forms() -> None:
    from lightkube.core.selector import build_selector

    assert parse_selector("") == {}
    assert build_selector(parse_selector("app=pdmesh, tier!=canary,gpu,!draining,example.com/zone==a")) == (
        "app=pdmesh,tier!=canary,gpu,!draining,example.com/zone=a"
    )
