"""The router runs without torch and without the engine: its process refuses to import either, starts, and serves
completions (streamed and not) and chat through real prefill and decode workers."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cluster import ROOT, Cluster, free_port, random_prompts, stream_completion, wait_until

# Runs `pdmesh router` with an import hook that makes importing torch or the engine an error.
FORBIDDING = """
import sys

class Forbid:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers") or name.startswith("services.engine"):
            raise ImportError(f"the router imported {name}")
        return None

sys.meta_path.insert(0, Forbid())
from services.cli import main
main()
"""


@pytest.fixture(scope="module")
def light_router(llama_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log_dir = tmp_path_factory.mktemp("light-router")
    cluster = Cluster(llama_checkpoint, log_dir)
    router = None
    try:
        prefill, decode = cluster.worker("prefill"), cluster.worker("decode")
        cluster.wait_workers()
        port = free_port()
        argv = ["router", "--model", str(llama_checkpoint), "--port", str(port)]
        argv += ["--prefill", prefill.address, "--decode", decode.address]
        log = open(log_dir / "router.log", "wb")  # noqa: SIM115 - closed with the process below
        router = subprocess.Popen(
            [sys.executable, "-c", FORBIDDING, *argv], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            if router is not None and router.poll() is not None:
                raise RuntimeError((log_dir / "router.log").read_text()[-3000:])
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 60, "the router to start without torch", interval=0.2)
        yield url
        assert router.poll() is None, (log_dir / "router.log").read_text()[-3000:]
    finally:
        if router is not None:
            router.terminate()
            router.wait(timeout=15)
        cluster.stop()


def test_the_router_serves_without_torch_or_the_engine(light_router: str, llama_checkpoint: Path) -> None:
    model = llama_checkpoint.name
    tokens, _, usage = stream_completion(light_router, model, random_prompts(3, [40])[0], 8)
    assert len(tokens) == 8 and usage["usage"]["completion_tokens"] == 8
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 5,
        "logprobs": True,
    }
    r = httpx.post(f"{light_router}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert (
        r.json()["usage"]["completion_tokens"] == 5
        and len(r.json()["choices"][0]["logprobs"]["content"]) == 5
    )
    r = httpx.post(
        f"{light_router}/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 0}, timeout=30
    )
    assert r.status_code == 400
    assert "pdmesh_requests_total" in httpx.get(f"{light_router}/metrics").text


@pytest.mark.parametrize("metrics_need_key", [False, True])
def test_the_api_key_guards_v1_and_optionally_metrics(llama_checkpoint: Path, metrics_need_key: bool) -> None:
    from fastapi.testclient import TestClient

    from services.router.app import RouterConfig, create_app

    config = RouterConfig(
        model=str(llama_checkpoint),
        prefill=("127.0.0.1:1",),  # nothing listens: these routes need no worker
        decode=("127.0.0.1:2",),
        api_key="s3cret",
        metrics_need_key=metrics_need_key,
        worker_wait_s=1,
    )
    with TestClient(create_app(config)) as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cre"}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/metrics").status_code == (401 if metrics_need_key else 200)
        assert client.get("/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_several_prompts_stream_as_several_choices(light_router: str, llama_checkpoint: Path) -> None:
    body = {
        "model": llama_checkpoint.name,
        "prompt": ["one two", "three four five"],
        "max_tokens": 6,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    per_choice: dict[int, int] = {0: 0, 1: 0}
    finished: set[int] = set()
    usage = {}
    with httpx.stream("POST", f"{light_router}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            for choice in event["choices"]:
                per_choice[choice["index"]] += 1
                if choice["finish_reason"]:
                    finished.add(choice["index"])
            usage = event.get("usage") or usage
    assert finished == {0, 1} and per_choice[0] >= 1 and per_choice[1] >= 1
    assert usage["completion_tokens"] == 12
