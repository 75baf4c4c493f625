"""What the router itself costs: time added to the first token, and streamed tokens per second one router process
sustains. Stand-in workers (this benchmark only) implement the gRPC contract and answer at once, so everything
measured is the router's (HTTP parsing, tokenization, routing, three gRPC legs, SSE).

    python bench/router.py                           # PD mode, 32 concurrent streams of 128 tokens
    python bench/router.py --streams 64 --router-workers 4 --clients 4   # 4 router processes on one port

Baseline, in the same run: the same streams read straight from the stand-in workers over gRPC (Reserve,
Prefill, Generate for PD; Generate for colocated), without the router. Router-added TTFT = the client's TTFT
through the router minus the direct one (medians); tokens/s are counted at the client.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "proto"))

from pdmesh.v1 import worker_pb2 as pb
from pdmesh.v1 import worker_pb2_grpc as pb_grpc

from services.up import free_port

VOCAB = 1000


class StandIn(
    pb_grpc.WorkerServicer, pb_grpc.PrefillServicer, pb_grpc.DecodeServicer, pb_grpc.ColocatedServicer
):
    """Answers every call at once: the first token from Prefill, then `max_tokens - 1` chunks of one token."""

    def __init__(self, role: str) -> None:
        self.role = role

    async def GetInfo(self, request, context):  # type: ignore[no-untyped-def]
        return pb.WorkerInfo(
            model="stand-in", role=self.role, layout_fingerprint="stand-in", num_blocks=1 << 20, block_size=16,
            max_model_len=1 << 16, vocab_size=VOCAB,
        )  # fmt: skip

    async def GetLoad(self, request, context):  # type: ignore[no-untyped-def]
        return pb.Load(total_blocks=1 << 20)

    async def WatchLoad(self, request, context):  # type: ignore[no-untyped-def]
        while True:
            yield pb.Load(total_blocks=1 << 20)
            await asyncio.sleep(request.interval_s or 1.0)

    async def Reserve(self, request, context):  # type: ignore[no-untyped-def]
        blocks = -(-len(request.prompt_token_ids) // 16)
        return pb.ReserveResponse(
            destination=pb.KvDestination(block_ids=range(blocks), layout_fingerprint="stand-in")
        )

    async def Renew(self, request, context):  # type: ignore[no-untyped-def]
        return pb.RenewResponse(held=request.request_ids)

    async def Release(self, request, context):  # type: ignore[no-untyped-def]
        return pb.ReleaseResponse(released=True)

    async def Prefill(self, request, context):  # type: ignore[no-untyped-def]
        return pb.PrefillResponse(first_token=7, text=" t", timings=pb.Timings())

    async def Abort(self, request, context):  # type: ignore[no-untyped-def]
        return pb.AbortResponse(aborted=True)

    async def Generate(self, request, context) -> AsyncIterator[pb.TokenChunk]:  # type: ignore[no-untyped-def]
        colocated = isinstance(request, pb.ColocatedRequest)
        total = request.sampling.max_tokens if colocated else self.max_tokens
        prompt = len(request.prompt_token_ids) if colocated else 0
        first = 0 if colocated else 1
        for n in range(first, total):
            done = n == total - 1
            yield pb.TokenChunk(
                token_ids=[8], text=" t", finished=done, finish_reason="length" if done else "",
                prompt_tokens=prompt, completion_tokens=n + 1, timings=pb.Timings() if n == first else None,
            )  # fmt: skip

    max_tokens = 128  # PD: Generate carries no sampling; the bench sets it per run


async def serve_stand_in(role: str, port: int, max_tokens: int) -> None:
    server = grpc.aio.server()
    servicer = StandIn(role)
    servicer.max_tokens = max_tokens
    for add in (
        pb_grpc.add_WorkerServicer_to_server,
        pb_grpc.add_PrefillServicer_to_server,
        pb_grpc.add_DecodeServicer_to_server,
        pb_grpc.add_ColocatedServicer_to_server,
    ):
        add(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def start(argv: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, text=True)
    return proc


async def through_router(url: str, streams: int, tokens: int, rounds: int) -> tuple[list[float], int, float]:
    ttfts: list[float] = []
    total = 0
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=streams * 2)) as http:

        async def one(i: int) -> None:
            nonlocal total
            body = {"model": "tiny", "prompt": [1 + (i % 500)] * 64, "max_tokens": tokens, "stream": True}
            started = time.perf_counter()
            first = None
            async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and '"choices":[{' in line.replace(" ", ""):
                        first = first or time.perf_counter()
                        total += 1
            ttfts.append((first or time.perf_counter()) - started)

        began = time.perf_counter()
        for _ in range(rounds):
            await asyncio.gather(*(one(i) for i in range(streams)))
        return ttfts, total, time.perf_counter() - began


async def direct(
    prefill: str, decode: str, streams: int, tokens: int, rounds: int
) -> tuple[list[float], int, float]:
    ttfts: list[float] = []
    total = 0
    async with grpc.aio.insecure_channel(prefill) as pc, grpc.aio.insecure_channel(decode) as dc:
        p, d = pb_grpc.PrefillStub(pc), pb_grpc.DecodeStub(dc)

        async def one(i: int) -> None:
            nonlocal total
            rid, prompt = f"r{i}-{time.perf_counter_ns()}", [1 + (i % 500)] * 64
            started = time.perf_counter()
            dest = (await d.Reserve(pb.ReserveRequest(request_id=rid, prompt_token_ids=prompt))).destination
            await p.Prefill(pb.PrefillRequest(request_id=rid, prompt_token_ids=prompt, destination=dest))
            first = time.perf_counter()
            total += 1
            async for _ in d.Generate(pb.GenerateRequest(request_id=rid, first_token=7)):
                total += 1
            ttfts.append(first - started)

        began = time.perf_counter()
        for _ in range(rounds):
            await asyncio.gather(*(one(i) for i in range(streams)))
        return ttfts, total, time.perf_counter() - began


def _client(job: tuple[str, str, str, int, int, int]) -> tuple[list[float], int, float]:
    kind, url_or_prefill, decode, streams, tokens, rounds = job
    if kind == "router":
        return asyncio.run(through_router(url_or_prefill, streams, tokens, rounds))
    return asyncio.run(direct(url_or_prefill, decode, streams, tokens, rounds))


def measure(
    kind: str, target: str, decode: str, streams: int, tokens: int, rounds: int, clients: int
) -> tuple[list[float], int, float]:
    """The streams split over `clients` client processes (one Python client tops out before a fleet of routers)."""
    if clients == 1:
        return _client((kind, target, decode, streams, tokens, rounds))
    jobs = [(kind, target, decode, streams // clients, tokens, rounds) for _ in range(clients)]
    with concurrent.futures.ProcessPoolExecutor(clients) as pool:
        results = list(pool.map(_client, jobs))
    return [t for r in results for t in r[0]], sum(r[1] for r in results), max(r[2] for r in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stand-in", choices=["prefill", "decode", "colocated"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128, help="streamed tokens per request")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--policy", default="kv_aware")
    ap.add_argument("--router-workers", type=int, default=1, help="router processes on the port")
    ap.add_argument("--clients", type=int, default=1, help="client processes sharing the streams")
    ap.add_argument("--json", help="write the numbers here too")
    args = ap.parse_args()
    if args.stand_in:
        asyncio.run(serve_stand_in(args.stand_in, args.port, args.tokens))
        return
    from services.engine.tiny_model import default_model_dir

    ports = {"prefill": free_port(), "decode": free_port(), "router": free_port()}
    procs = []
    try:
        for role in ("prefill", "decode"):
            procs.append(
                start(
                    [__file__, "--stand-in", role, "--port", str(ports[role]), "--tokens", str(args.tokens)]
                )
            )
            assert procs[-1].stdout is not None and procs[-1].stdout.readline().strip() == "ready"
        addr = {r: f"127.0.0.1:{p}" for r, p in ports.items()}
        router = [
            "-m", "services.cli", "router", "--model", str(default_model_dir()), "--served-model-name", "tiny",
            "--port", str(ports["router"]), "--prefill", addr["prefill"], "--decode", addr["decode"],
            "--policy", args.policy, "--workers", str(args.router_workers),
        ]  # fmt: skip
        procs.append(start(router))
        url = f"http://127.0.0.1:{ports['router']}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the router did not come up"
            time.sleep(0.2)
        asyncio.run(through_router(url, args.streams, args.tokens, 1))  # warm-up
        shape = (args.streams, args.tokens, args.rounds, args.clients)
        base_ttft, base_tokens, base_s = measure("direct", addr["prefill"], addr["decode"], *shape)
        ttft, tokens, seconds = measure("router", url, "", *shape)
    finally:
        for p in reversed(procs):  # the router first, so it does not log the stand-ins going away
            p.terminate()
            p.wait(timeout=10)
    b50, r50 = statistics.median(base_ttft) * 1e3, statistics.median(ttft) * 1e3
    b_rate, r_rate = base_tokens / base_s, tokens / seconds
    print(f"router overhead, PD mode, stand-in workers, {args.streams} concurrent streams x {args.tokens} tokens, "
          f"{args.rounds} rounds, policy {args.policy}, {args.router_workers} router process(es), "
          f"{args.clients} client process(es)")  # fmt: skip
    print(
        f"  TTFT p50   direct gRPC (baseline): {b50:8.2f} ms   through the router: {r50:8.2f} ms   added: {r50 - b50:7.2f} ms"
    )
    print(
        f"  tokens/s   direct gRPC (baseline): {b_rate:8.0f}      through the router: {r_rate:8.0f}      ratio: {r_rate / b_rate:5.2f}x"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"ttft_ms": [b50, r50], "tokens_per_s": [b_rate, r_rate]}))


if __name__ == "__main__":
    main()
