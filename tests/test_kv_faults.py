"""A randomized fault run on real processes: many streamed requests, clients that leave at random moments, a
decode worker killed, another stalled (SIGSTOP) for three seconds. Every request ends with its full, correct
tokens or with an error (never a silent short or wrong answer); the prefill worker keeps serving the requests the
faults do not touch; afterwards every surviving worker holds no KV block within a few seconds."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from pathlib import Path

import httpx

from services.common.sampling_params import SamplingParams
from services.engine.llm import LLM
from tests.cluster import Cluster, load, random_prompts, wait_until

REQUESTS = 64
IN_FLIGHT = 12
KILL_AT, STALL_AT, STALL_S = 0.8, 1.5, 3.0


async def one(url: str, model: str, prompt: list[int], max_tokens: int, leave_after: float | None) -> dict:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
    }
    started = time.monotonic()
    tokens: list[int] = []
    outcome = "short"  # the stream ended without [DONE] or an error: must never happen
    try:
        async with (
            httpx.AsyncClient(timeout=60) as http,
            asyncio.timeout(leave_after),
            http.stream("POST", f"{url}/v1/completions", json=body) as r,
        ):
            if r.status_code != 200:
                outcome = f"error {r.status_code}"
            else:
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        outcome = "done" if outcome == "short" else outcome
                    elif line.startswith("data: "):
                        event = json.loads(line[6:])
                        if "error" in event:
                            outcome = "error event"
                        else:
                            tokens += event["choices"][0]["token_ids"]
    except TimeoutError:
        outcome = "left"
    return {"outcome": outcome, "tokens": tokens, "started": started, "ended": time.monotonic()}


def test_random_faults_lose_nothing_and_leak_nothing(llama_checkpoint: Path, tmp_path: Path) -> None:
    model = llama_checkpoint.name
    rng = random.Random(2026)
    prompts = random_prompts(9, [rng.randrange(16, 300) for _ in range(REQUESTS)])
    max_tokens = [rng.randrange(8, 40) for _ in range(REQUESTS)]
    leave = [rng.uniform(0.05, 2.0) if rng.random() < 0.3 else None for _ in range(REQUESTS)]
    llm = LLM(str(llama_checkpoint), device="cpu", dtype="float32", num_blocks=2048, progress=False)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in max_tokens]
    expected = [c.token_ids for c in llm.generate(prompts, params)]
    del llm

    cluster = Cluster(llama_checkpoint, tmp_path)
    try:
        cluster.worker("prefill", "--max-num-batched-tokens", "32")
        for _ in range(3):
            cluster.worker("decode", "--reservation-lease", "2", "--quarantine", "2")
        cluster.router("--kv-checksum")
        cluster.wait_ready()
        killed, stalled, _ = cluster.of_role("decode")

        async def faults(t0: float) -> None:
            await asyncio.sleep(KILL_AT)
            killed.kill()
            await asyncio.sleep(STALL_AT - KILL_AT)
            os.kill(stalled.popen.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(STALL_S)
            finally:
                os.kill(stalled.popen.pid, signal.SIGCONT)

        async def run() -> tuple[list[dict], float]:
            gate = asyncio.Semaphore(IN_FLIGHT)
            t0 = time.monotonic()

            async def gated(i: int) -> dict:
                async with gate:
                    return await one(cluster.url, model, prompts[i], max_tokens[i], leave[i])

            *results, _ = await asyncio.gather(*(gated(i) for i in range(REQUESTS)), faults(t0))
            return results, t0

        results, t0 = asyncio.run(run())
        outcomes = [r["outcome"] for r in results]
        assert "short" not in outcomes, outcomes
        for i, r in enumerate(results):
            if r["outcome"] == "done":  # complete answers are right answers
                assert r["tokens"] == expected[i], (i, r["tokens"], expected[i])
            else:
                assert r["outcome"] == "left" or r["outcome"].startswith("error"), r["outcome"]
        done = [r for r in results if r["outcome"] == "done"]
        assert len(done) >= REQUESTS // 3, outcomes
        # requests that began and ended while one decode worker was dead and another stalled were still served
        stall = (t0 + STALL_AT, t0 + STALL_AT + STALL_S)
        assert any(stall[0] < r["started"] and r["ended"] < stall[1] for r in done), outcomes
        assert not killed.alive() and stalled.alive()
        for proc in [p for p in cluster.procs if p.address and p.alive()]:
            wait_until(
                lambda a=proc.address: load(a).used_blocks == 0, 5, f"{proc.name} to hold no blocks", 0.1
            )
        r = httpx.post(
            f"{cluster.url}/v1/completions",
            json={
                "model": model,
                "prompt": prompts[0],
                "max_tokens": max_tokens[0],
                "temperature": 0,
                "ignore_eos": True,
            },
            timeout=30,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == max_tokens[0]
    finally:
        cluster.stop()
