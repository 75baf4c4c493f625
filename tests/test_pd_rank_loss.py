"""A rank lost on either side of a parallel PD cluster (2 prefill and 2 decode workers of `--tp 2`, real
processes): the worker that lost it exits, the requests it held end with an error within seconds (never hang),
the surviving workers hold no KV block afterwards, and the router goes on serving with the workers left."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx

from tests.cluster import load, random_prompts, start_cluster, wait_until
from tests.test_parallel_worker import WORKER, followers

PROMPTS = random_prompts(3, [9, 14, 20, 11])


def stream(url: str, model: str, prompt: list[int], outcome: dict) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": 400, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            outcome["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: {") and "error" in json.loads(line[6:]):
                    outcome["end"] = "error"
                elif line == "data: [DONE]":
                    outcome.setdefault("end", "done")
    except httpx.HTTPError as e:
        outcome["end"] = f"transport: {e}"
    outcome["at"] = time.monotonic()


def test_a_lost_rank_on_either_side(dense: Path, tmp_path: Path) -> None:
    cluster = start_cluster(
        dense, tmp_path, "pd", prefill=2, decode=2, worker_args=(*WORKER, "--tp", "2", "--num-blocks", "300")
    )
    try:
        prefills, decodes = cluster.of_role("prefill"), cluster.of_role("decode")
        outcomes = [{} for _ in PROMPTS]
        threads = [
            threading.Thread(target=stream, args=(cluster.url, dense.name, p, o))
            for p, o in zip(PROMPTS, outcomes, strict=True)
        ]
        for t in threads:
            t.start()
        wait_until(lambda: sum(load(d.address).running for d in decodes) == len(PROMPTS), 30, "every stream")
        victim = decodes[0]
        held = load(victim.address).running
        (rank,) = followers(victim.popen.pid)
        killed = time.monotonic()
        os.kill(rank, signal.SIGKILL)
        for t in threads:
            t.join(timeout=30)
        assert all(not t.is_alive() for t in threads)
        errors = [o for o in outcomes if o.get("end") != "done"]
        assert len(errors) == held and all(o["at"] - killed < 10 for o in errors), outcomes
        wait_until(lambda: not victim.alive(), 10, "the worker that lost a rank to exit")

        def survivors_idle() -> bool:
            return all(load(w.address).used_blocks == 0 for w in (*prefills, decodes[1]))

        wait_until(survivors_idle, 10, "the surviving workers to hold no block")
        body = {"model": dense.name, "prompt": PROMPTS[0], "max_tokens": 4}
        for _ in range(4):
            r = httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=30)
            assert r.status_code == 200, r.text

        (rank,) = followers(prefills[0].popen.pid)  # now a prefill rank
        os.kill(rank, signal.SIGKILL)
        wait_until(lambda: not prefills[0].alive(), 10, "the prefill worker that lost a rank to exit")
        for _ in range(4):
            r = httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=30)
            assert r.status_code == 200, r.text
        wait_until(
            lambda: all(load(w.address).used_blocks == 0 for w in (prefills[1], decodes[1])), 10, "idle"
        )
    finally:
        cluster.stop()
