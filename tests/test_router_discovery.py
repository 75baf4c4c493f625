"""Workers found at run time: a router following a DNS name (a headless Service's records, served here by a real
DNS server over UDP) uses a worker within seconds of its record appearing and drops it when the record goes; a
joining worker whose KV layout differs from the fleet's is refused, never picked."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cluster import Cluster, free_port, http_json, load, spawn, wait_until
from tests.dns_server import DnsServer

NAME = "workers.pdmesh.test"
PROMPT = [0, 11, 42, 97, 5, 300, 18, 64]


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    server = DnsServer()
    yield server
    server.stop()


def worker_on(cluster: Cluster, role: str, host: str, port: int, *extra: str):  # type: ignore[no-untyped-def]
    argv = [role, "--model", str(cluster.model), "--host", host, "--port", str(port), "--device", "cpu"]
    argv += ["--dtype", "float32", "--num-blocks", "512", *extra]
    proc = spawn(f"{role}-{host}", argv, cluster.log_dir)
    proc.address = f"{host}:{port}"
    cluster.procs.append(proc)
    return proc


def start_router(cluster: Cluster, *args: str) -> str:
    port = free_port()
    argv = ["router", "--model", str(cluster.model), "--port", str(port), "--served-model-name", "tiny"]
    cluster.procs.append(spawn("router", [*argv, *args, "--worker-wait", "60"], cluster.log_dir))
    cluster.url = f"http://127.0.0.1:{port}"
    return cluster.url


def workers(url: str) -> dict[str, dict]:
    return {w["address"]: w for w in http_json(f"{url}/health")[1].get("workers", [])}


def complete(url: str) -> None:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "ignore_eos": True}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text


def test_dns_workers_join_and_leave(llama_checkpoint: Path, tmp_path: Path, dns_server: DnsServer) -> None:
    cluster = Cluster(llama_checkpoint, tmp_path)
    try:
        port = free_port()
        a = worker_on(cluster, "colocated", "127.0.0.2", port)
        b = worker_on(cluster, "colocated", "127.0.0.3", port)
        cluster.wait_workers()
        dns_server.set(NAME, ["127.0.0.2"])
        url = start_router(
            cluster, "--colocated", f"dns://{NAME}:{port}", "--dns-server", dns_server.address,
            "--dns-interval", "0.3", "--policy", "round_robin",
        )  # fmt: skip
        cluster.wait_ready()
        assert set(workers(url)) == {a.address}

        dns_server.set(NAME, ["127.0.0.2", "127.0.0.3"])  # a pod became ready
        wait_until(lambda: workers(url).get(b.address, {}).get("healthy"), 10, "the new worker to be used")
        before = load(b.address).computed_tokens
        for _ in range(4):
            complete(url)
        assert load(b.address).computed_tokens > before  # round robin reached the new worker

        # a stalled worker keeps its connections but stops reporting its load: down within seconds, back after
        os.kill(b.popen.pid, signal.SIGSTOP)
        try:
            wait_until(
                lambda: not workers(url)[b.address]["healthy"], 8, "the stalled worker to be marked down"
            )
            assert "no load report" in workers(url)[b.address]["error"]
            complete(url)  # served by the other one meanwhile
        finally:
            os.kill(b.popen.pid, signal.SIGCONT)
        wait_until(lambda: workers(url)[b.address]["healthy"], 10, "the resumed worker to be up again")

        dns_server.set(NAME, ["127.0.0.3"])  # a pod went away
        wait_until(lambda: a.address not in workers(url), 10, "the departed worker to be dropped")
        before = load(a.address).computed_tokens
        for _ in range(4):
            complete(url)
        assert load(a.address).computed_tokens == before  # nothing goes to a worker no longer listed

        def exported() -> bool:
            metrics = httpx.get(f"{url}/metrics", timeout=5).text
            return f'address="{a.address}"' in metrics.split("pdmesh_worker_up", 1)[1].split("# HELP", 1)[0]

        wait_until(lambda: not exported(), 5, "the departed worker's gauges to go")

        dns_server.set(NAME, [])  # the name has no records: no workers, a clear 503
        wait_until(lambda: not workers(url), 10, "every worker to be dropped")
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": PROMPT}, timeout=30)
        assert r.status_code == 503 and "no healthy colocated worker" in r.json()["error"]["message"]
    finally:
        cluster.stop()


def test_joining_worker_with_another_layout_is_refused(
    llama_checkpoint: Path, tmp_path: Path, dns_server: DnsServer
) -> None:
    cluster = Cluster(llama_checkpoint, tmp_path)
    try:
        prefill, decode = cluster.worker("prefill"), cluster.worker("decode")
        port = free_port()
        odd = worker_on(cluster, "decode", "127.0.0.2", port, "--block-size", "32")
        cluster.wait_workers()
        url = start_router(
            cluster, "--prefill", prefill.address, "--decode", f"{decode.address},dns://{NAME}:{port}",
            "--dns-server", dns_server.address, "--dns-interval", "0.3", "--policy", "least_load",
        )  # fmt: skip
        cluster.wait_ready()
        dns_server.set(NAME, ["127.0.0.2"])
        wait_until(
            lambda: "KV layout" in workers(url).get(odd.address, {}).get("error", ""), 10, "the refusal"
        )
        error = workers(url)[odd.address]["error"]
        assert "B32" in error or "32" in error, error  # it names the joiner's layout and the fleet's
        for _ in range(6):
            complete(url)  # least_load would pick the idle joiner if it were allowed
        assert load(odd.address).computed_tokens == 0 and load(odd.address).used_blocks == 0
        status, health = http_json(f"{url}/health")
        assert (
            status == 200 and health["status"] == "ok"
        )  # the refused joiner does not make the fleet unhealthy
    finally:
        cluster.stop()


def test_kubernetes_pods_watched(llama_checkpoint: Path, tmp_path: Path) -> None:
    """The router lists and watches pods through the Kubernetes API (a local stand-in serving the API's real
    JSON: no API server can run here) and follows them as they become ready, unready and are deleted."""
    from tests.k8s_apiserver import FakeApiServer

    api = FakeApiServer().start()
    cluster = Cluster(llama_checkpoint, tmp_path)
    try:
        port = free_port()
        a = worker_on(cluster, "colocated", "127.0.0.2", port)
        b = worker_on(cluster, "colocated", "127.0.0.3", port)
        cluster.wait_workers()
        api.add_pod("pdmesh-colocated-0", "colocated", "127.0.0.2", labels={"app": "pdmesh"})
        api.add_pod("pdmesh-colocated-1", "colocated", "127.0.0.3", ready=False, labels={"app": "pdmesh"})
        api.add_pod("other-0", "colocated", "127.0.0.4", labels={"app": "other"})
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        rport = free_port()
        argv = ["router", "--model", str(cluster.model), "--port", str(rport), "--served-model-name", "tiny"]
        argv += ["--kubernetes-selector", "app=pdmesh", "--kubernetes-port", str(port)]
        argv += ["--policy", "round_robin"]
        cluster.procs.append(spawn("router", argv, tmp_path, env={"KUBECONFIG": str(kubeconfig)}))
        cluster.url = url = f"http://127.0.0.1:{rport}"
        cluster.wait_ready()
        assert set(workers(url)) == {a.address}  # the unready pod and the other app's are not used

        api.set_ready("pdmesh-colocated-1", True)
        wait_until(lambda: workers(url).get(b.address, {}).get("healthy"), 10, "the ready pod to be used")
        before = load(b.address).computed_tokens
        for _ in range(4):
            complete(url)
        assert load(b.address).computed_tokens > before

        api.delete_pod("pdmesh-colocated-0")
        wait_until(lambda: a.address not in workers(url), 10, "the deleted pod to be dropped")
        before = load(a.address).computed_tokens
        for _ in range(4):
            complete(url)
        assert load(a.address).computed_tokens == before
    finally:
        cluster.stop()
        api.stop()


@pytest.mark.parametrize(
    ("prefill_args", "decode_args", "marks"),
    [((), ("--block-size", "32"), ("|B16|", "|B32|")), (("--tp", "2"), (), ("|TP2", "|TP1"))],
    ids=["block-size", "tensor-parallel"],
)
def test_static_workers_with_unequal_layouts_stop_the_router(
    llama_checkpoint: Path, tmp_path: Path, prefill_args: tuple, decode_args: tuple, marks: tuple
) -> None:
    """Prefill and decode workers that could not exchange KV (another block size, another tensor-parallel
    layout): the router never serves, and says why, naming both layouts."""
    cluster = Cluster(llama_checkpoint, tmp_path)
    try:
        cluster.worker("prefill", *prefill_args)
        cluster.worker("decode", *decode_args)
        cluster.wait_workers()
        cluster.router()

        def refusal() -> str:
            status, health = http_json(f"{cluster.url}/health")
            return health.get("error", "") if status == 503 else ""

        wait_until(lambda: "KV layout" in refusal(), 30, "the router to refuse the fleet")
        message = refusal()
        assert all(mark in message for mark in marks), message
        body = {"model": llama_checkpoint.name, "prompt": PROMPT, "max_tokens": 2}
        r = httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=30)
        assert r.status_code == 503 and "KV layout" in r.json()["error"]["message"]
    finally:
        cluster.stop()
