"""`pdmesh ray up|status|down` on a real local Ray head (`ray start --head --block` in its own process group, on
CPU): the deployment of the embedded model serves through its router token-identically to `transformers`; pdmesh's metrics reach Ray's
metrics export (every metric the Ray Grafana dashboard queries among them); the actors show in `ray list actors`;
a decode actor killed outright is restarted by Ray and the cluster serves again; `down` leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from services.common.tokenizer import Tokenizer
from services.engine.tiny_model import default_model_dir
from tests.cluster import ROOT, free_port, random_prompts, stream_completion, wait_until
from tests.test_dashboard import exported_names
from tests.test_models_vs_transformers import hf_generate

RAY = Path(sys.executable).with_name("ray")
DASHBOARD = ROOT / "deploy" / "ray" / "pdmesh_grafana_dashboard.json"
NAME = "t"
MAX_TOKENS = 12


class Head:
    def __init__(self, address: str, metrics_url: str, proc: subprocess.Popen[bytes]) -> None:
        self.address, self.metrics_url, self.proc = address, metrics_url, proc


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    gcs, metrics, dashboard = free_port(), free_port(), free_port()
    # NOTE: Ray's socket paths must stay short (108 bytes), so not under pytest's tmp_path
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {**os.environ, "RAY_metrics_report_interval_ms": "1000", "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(Path(temp) / "head.log", "wb")  # noqa: SIM115 (open while the head runs)
    proc = subprocess.Popen(
        [
            *(
                str(RAY),
                "start",
                "--head",
                "--block",
                "--port",
                str(gcs),
                "--num-cpus",
                "8",
                "--num-gpus",
                "0",
            ),
            *("--metrics-export-port", str(metrics), "--dashboard-port", str(dashboard)),
            *("--include-dashboard", "true", "--temp-dir", temp, "--disable-usage-stats"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # its own process group: stopped by its id with everything Ray started
    )
    address = f"127.0.0.1:{gcs}"
    try:
        wait_until(
            lambda: (
                proc.poll() is not None
                or subprocess.run(
                    [str(RAY), "health-check", "--address", address], capture_output=True
                ).returncode
                == 0
            ),
            120,
            "the Ray head",
            interval=1.0,
        )
        assert proc.poll() is None, (Path(temp) / "head.log").read_text()
        yield Head(address, f"http://127.0.0.1:{metrics}/metrics", proc)
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=8)
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def pdmesh(head: Head, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    command, *rest = argv
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "ray",
            command,
            "--address",
            head.address,
            "--name",
            NAME,
            *rest,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def status(head: Head) -> dict[str, dict]:
    out = pdmesh(head, "status", "--json", timeout=60)
    assert out.returncode == 0, out.stderr
    return {a["name"]: a for a in json.loads(out.stdout)["actors"]}


def ray_list(head: Head, what: str) -> list[dict]:
    out = subprocess.run(
        [str(RAY), "list", what, "--address", head.address, "--format", "json", "--limit", "1000"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[-1][0] != "Z"


def greedy(url: str, model: str, prompt: list[int]) -> list[int] | None:
    try:
        return stream_completion(url, model, prompt, MAX_TOKENS)[0]
    except (AssertionError, httpx.HTTPError):
        return None


def test_ray_up_serves_exports_metrics_restarts_and_goes_down(head: Head) -> None:
    checkpoint = default_model_dir()  # the embedded model, which `pdmesh ray up` serves without --model
    port = free_port()
    up = pdmesh(
        head,
        "up",
        *("--prefill", "1", "--decode", "2", "--port", str(port)),
        *("--device", "cpu", "--num-blocks", "256", "--timeout", "240"),
    )
    assert up.returncode == 0, up.stdout + up.stderr
    assert re.search(rf"ready at http://[0-9.]+:{port}", up.stdout), up.stdout
    url = f"http://127.0.0.1:{port}"
    model = checkpoint.name
    again = pdmesh(head, "up", "--device", "cpu", "--port", str(free_port()))
    assert again.returncode == 2 and "already running" in again.stderr, again.stderr

    # served through the router, token for token what transformers generates
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompts = random_prompts(3, [7, 40, 70])
    expected = [hf_generate(hf, p, MAX_TOKENS)[0] for p in prompts]
    assert [greedy(url, model, p) for p in prompts] == expected

    # again, once the router's index holds its blocks (KV events arrive on their own stream): a cache hit at routing
    # time, so the routed-cached-tokens counter gains and reaches Ray's export (counters appear there at their first gain)
    def routed_a_hit() -> bool:
        assert greedy(url, model, prompts[2]) == expected[2]
        counts = re.findall(
            r"^pdmesh_router_routed_cached_tokens_total{[^}]*} (\S+)$", httpx.get(f"{url}/metrics").text, re.M
        )
        return sum(map(float, counts)) > 0

    wait_until(routed_a_hit, 30, "a request routed to a worker holding its prefix", interval=0.5)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    text = Tokenizer(checkpoint).decode(expected[0])
    reply = client.completions.create(model=model, prompt=prompts[0], max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].text == text or reply.choices[0].finish_reason == "stop"

    # three workers on one node, each on a port of its own; the actors are Ray's
    actors = status(head)
    assert set(actors) == {f"{NAME}-router-0", f"{NAME}-prefill-0", f"{NAME}-decode-0", f"{NAME}-decode-1"}
    workers = {n: a for n, a in actors.items() if a["role"] != "router"}
    addresses = [a["address"] for a in workers.values()]
    assert len(set(addresses)) == 3 and len({a.rsplit(":", 1)[1] for a in addresses}) == 3
    listed = {a["name"]: a for a in ray_list(head, "actors") if a["state"] == "ALIVE"}
    assert set(actors) <= set(listed)
    assert all(listed[n]["ray_namespace"] == "pdmesh" for n in actors)

    # pdmesh's metrics in Ray's export: per worker, and every one the Ray dashboard queries
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {
        m
        for p in dashboard["panels"]
        for t in p.get("targets", [])
        for m in re.findall(r"ray_pdmesh_[a-z0-9_]+", t["expr"])
    }
    assert len(queried) >= 15

    def exported() -> tuple[str, set[str]]:
        text = httpx.get(head.metrics_url, timeout=10).text
        return text, exported_names(text)

    deadline = time.monotonic() + 60
    while not queried <= (names := exported()[1]) and time.monotonic() < deadline:
        time.sleep(1.0)
    assert queried <= names, sorted(queried - names)
    text, _ = exported()
    for address in addresses:
        assert re.search(rf'ray_pdmesh_worker_kv_blocks_total{{[^}}]*address="{address}"[^}}]*}} 256', text)
    ttft_count = re.search(r"^ray_pdmesh_time_to_first_token_seconds_count{[^}]*} (\S+)$", text, re.M)
    assert ttft_count and float(ttft_count[1]) >= len(prompts) + 2

    # a decode actor killed outright: Ray restarts it, its worker process goes with it, the routers find the new one
    victim = actors[f"{NAME}-decode-0"]
    worker_pid = victim["info"]["pid"]
    os.kill(victim["pid"], signal.SIGKILL)
    killed = time.monotonic()

    def recovered() -> bool:
        now = status(head)[f"{NAME}-decode-0"]
        return bool(now["restarts"]) and now["address"] not in (None, victim["address"])

    wait_until(recovered, 90, "the decode actor to come back", interval=1.0)
    wait_until(
        lambda: all(greedy(url, model, p) == e for p, e in zip(prompts, expected, strict=True)),
        90 - (time.monotonic() - killed),
        "the cluster to serve again",
        interval=1.0,
    )
    assert time.monotonic() - killed < 90
    assert not alive(worker_pid)
    new_worker = status(head)[f"{NAME}-decode-0"]["info"]["pid"]

    # down: no pdmesh actor, no placement group, no worker process, the port closed
    down = pdmesh(head, "down", "--drain-timeout", "5", timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not [
        a for a in ray_list(head, "actors") if a["state"] != "DEAD" and a["name"].startswith(f"{NAME}-")
    ]
    groups = ray_list(head, "placement-groups")
    assert not [g for g in groups if g["state"] != "REMOVED" and g["name"].startswith(f"{NAME}-")]
    pids = [new_worker, *(a["info"]["pid"] for n, a in workers.items() if n != f"{NAME}-decode-0")]
    wait_until(lambda: not any(alive(p) for p in pids), 30, "the worker processes to exit")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=5)
    gone = pdmesh(head, "status", timeout=60)
    assert gone.returncode == 1 and "no deployment" in gone.stderr
