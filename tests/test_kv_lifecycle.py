"""The KV lifecycle never leaks: reservations whose caller is gone, leases that follow the prefill, requests no
prefill worker can take, and clients that leave at any moment. Real processes, real Mooncake TCP transfers.

The clusters keep the default lease (10 s) and quarantine (30 s) unless a test is about them, so a leaked
reservation would still be held long after the 2 s these tests allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import torch
from pdmesh.v1 import worker_pb2 as pb
from pdmesh.v1 import worker_pb2_grpc as pb_grpc

from services.transfer.checksum import kv_checksum
from services.transfer.mooncake_engine import MooncakeEngine
from tests.cluster import Cluster, load, random_prompts, start_cluster, wait_until

SAMPLING = pb.SamplingParams(max_tokens=4, temperature=0, top_p=1, ignore_eos=True, skip_special_tokens=True)


@pytest.fixture(scope="module")
def pd(llama_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = start_cluster(
        llama_checkpoint, tmp_path_factory.mktemp("lifecycle"), worker_args=("--max-num-batched-tokens", "16")
    )
    yield cluster
    cluster.stop()


def no_blocks_within(cluster: Cluster, seconds: float, what: str) -> None:
    for proc in cluster.procs:
        if proc.address and proc.alive():
            wait_until(lambda a=proc.address: load(a).used_blocks == 0, seconds, f"{proc.name}: {what}", 0.05)


def completion(model: str, prompt: list[int], max_tokens: int, stream: bool) -> dict:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


def test_a_reserve_whose_caller_is_gone_holds_nothing(pd: Cluster) -> None:
    """A caller that gives up on Reserve (cancel, deadline) releases the id, as the router does. Whatever the
    moment, nothing stays held: the worker undoes a reservation whose call was cancelled, and a Release that
    overtakes its Reserve leaves a tombstone that undoes the late reservation."""
    (decode,) = pd.of_role("decode")
    stub = pb_grpc.DecodeStub(grpc.insecure_channel(decode.address))
    rng = random.Random(3)
    gave_up = 0
    busy = keep_decoding(
        stub, 48
    )  # the engine thread is stepping: a Reserve waits for it while its caller leaves
    for i, prompt in enumerate(random_prompts(5, [rng.randrange(100, 600) for _ in range(60)])):
        rid = f"gone-{i}"
        call = stub.Reserve.future(
            pb.ReserveRequest(request_id=rid, prompt_token_ids=prompt, sampling=SAMPLING),
            timeout=rng.choice([None, 0.001, 0.003]),
        )
        time.sleep(rng.uniform(0, 0.003))
        if call.cancel() or call.exception() is not None:
            gave_up += 1
        stub.Release(pb.ReleaseRequest(request_id=rid, writer_done=True))
    assert gave_up >= 5, f"only {gave_up} of 60 calls were given up: the test exercised little"
    for rid in busy:
        stub.Release(pb.ReleaseRequest(request_id=rid, writer_done=True))
    no_blocks_within(pd, 2, "reservations of callers that left to be undone")
    # the same with the worker stalled: every call reaches it after its caller gave up, Release after Reserve
    os.kill(decode.popen.pid, signal.SIGSTOP)
    try:
        calls = [
            stub.Reserve.future(
                pb.ReserveRequest(request_id=f"late-{i}", prompt_token_ids=prompt, sampling=SAMPLING),
                timeout=0.3,
            )
            for i, prompt in enumerate(random_prompts(6, [200] * 8))
        ]
        for call in calls:
            assert call.exception() is not None and call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        releases = [
            stub.Release.future(pb.ReleaseRequest(request_id=f"late-{i}", writer_done=True)) for i in range(8)
        ]
        time.sleep(0.2)
    finally:
        os.kill(decode.popen.pid, signal.SIGCONT)
    for release in releases:
        release.result()
    no_blocks_within(pd, 2, "late reservations of callers that left to be undone")
    assert load(decode.address).parked == 0


def keep_decoding(stub: pb_grpc.DecodeStub, n: int) -> list[str]:
    """n long generations on the decode worker (reserved, admitted, streamed into the void); returns their ids."""
    rids = [f"busy-{i}" for i in range(n)]
    params = pb.SamplingParams(max_tokens=1800, temperature=0, top_p=1, ignore_eos=True)
    for rid, prompt in zip(rids, random_prompts(8, [100] * n), strict=True):
        stub.Reserve(pb.ReserveRequest(request_id=rid, prompt_token_ids=prompt, sampling=params))
        stream = stub.Generate(pb.GenerateRequest(request_id=rid, first_token=5))
        threading.Thread(target=drain, args=(stream,), daemon=True).start()
    return rids


def drain(stream: Iterator[pb.TokenChunk]) -> None:
    with contextlib.suppress(grpc.RpcError):  # ended by a Release
        for _ in stream:
            pass


def test_clients_leaving_at_random_moments_free_every_block_within_2s(
    pd: Cluster, llama_checkpoint: Path
) -> None:
    """60 clients leave at random moments, streamed or not, while the decode worker stalls for a second (SIGSTOP)
    in the middle: calls to it pile up at every stage (Reserve, the KV writes, Generate) and their clients leave
    meanwhile. Within 2 s of the last one leaving, no worker holds a block."""
    model = llama_checkpoint.name
    (decode,) = pd.of_role("decode")
    rng = random.Random(11)
    lengths = [rng.randrange(10, 300) for _ in range(60)]

    async def client(
        prompt: list[int], max_tokens: int, stream: bool, start: float, leave_after: float
    ) -> str:
        await asyncio.sleep(start)
        async with httpx.AsyncClient(timeout=60) as http:
            try:
                async with asyncio.timeout(leave_after):
                    body = completion(model, prompt, max_tokens, stream)
                    if stream:
                        async with http.stream("POST", f"{pd.url}/v1/completions", json=body) as r:
                            async for _ in r.aiter_lines():
                                pass
                    else:
                        await http.post(f"{pd.url}/v1/completions", json=body)
                return "finished"
            except TimeoutError:
                return "left"

    async def stall_decode() -> None:
        await asyncio.sleep(0.4)
        os.kill(decode.popen.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(1.0)
        finally:
            os.kill(decode.popen.pid, signal.SIGCONT)

    async def run_all() -> list[str]:
        clients = [
            client(p, rng.randrange(2, 60), rng.random() < 0.5, rng.uniform(0, 0.8), rng.uniform(0.05, 1.0))
            for p in random_prompts(7, lengths)
        ]
        *outcomes, _ = await asyncio.gather(*clients, stall_decode())
        return outcomes

    outcomes = asyncio.run(run_all())
    assert outcomes.count("left") >= 20, outcomes
    no_blocks_within(pd, 2, "every block of the clients that left to be freed")
    # and the cluster still serves
    r = httpx.post(f"{pd.url}/v1/completions", json=completion(model, [0, 5, 6, 7], 5, False), timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


def test_no_prefill_worker_releases_the_reservation_at_once(llama_checkpoint: Path, tmp_path: Path) -> None:
    cluster = start_cluster(llama_checkpoint, tmp_path)
    try:
        (prefill,) = cluster.of_role("prefill")
        prefill.kill()

        def marked_down() -> bool:
            health = httpx.get(f"{cluster.url}/health").json()
            return not any(w["healthy"] for w in health["workers"] if w["role"] == "prefill")

        wait_until(marked_down, 10, "the router to see the prefill worker down")
        r = httpx.post(
            f"{cluster.url}/v1/completions",
            json=completion(llama_checkpoint.name, [0, *range(5, 300)], 4, False),
            timeout=30,
        )
        assert r.status_code == 503 and "prefill" in r.json()["error"]["message"], r.text
        (decode,) = cluster.of_role("decode")
        assert load(decode.address).used_blocks == 0
        assert load(decode.address).parked == 0
    finally:
        cluster.stop()


@pytest.fixture
def short_leases(llama_checkpoint: Path, tmp_path: Path) -> Iterator[Cluster]:
    """Leases of 0.5 s, and prefill chunks of 2 tokens: a long prompt takes several leases to prefill."""
    cluster = Cluster(llama_checkpoint, tmp_path)
    try:
        cluster.worker("prefill", "--max-num-batched-tokens", "2", "--num-blocks", "256")
        cluster.worker("decode", "--reservation-lease", "0.5", "--quarantine", "1", "--num-blocks", "160")
        cluster.router("--kv-checksum")
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()


def test_a_lease_lives_as_long_as_the_prefill_makes_progress(
    short_leases: Cluster, llama_checkpoint: Path
) -> None:
    prompt = random_prompts(1, [1900])[0]  # 950 chunks
    r = httpx.post(
        f"{short_leases.url}/v1/completions",
        json=completion(llama_checkpoint.name, prompt, 6, False),
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 6
    prefill_ms = float(r.headers["x-pdmesh-prefill-ms"])
    assert prefill_ms > 1000, f"the prefill took {prefill_ms:.0f} ms, not two leases of 0.5 s"
    no_blocks_within(short_leases, 2, "blocks to be freed")


def test_a_stalled_prefill_loses_its_lease_and_never_writes_into_reused_blocks(
    short_leases: Cluster, llama_checkpoint: Path
) -> None:
    (prefill,) = short_leases.of_role("prefill")
    (decode,) = short_leases.of_role("decode")
    prompt = random_prompts(2, [1900])[0]  # 119 of the decode worker's 160 blocks
    result: dict = {}
    keep = threading.Event()
    keep.set()

    async def send() -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            body = completion(llama_checkpoint.name, prompt, 4, False)
            r = await http.post(f"{short_leases.url}/v1/completions", json=body)
            result.update(status=r.status_code, body=r.json())

    async def scenario() -> None:
        request = asyncio.create_task(send())
        while load(decode.address).used_blocks == 0:  # reserved; the prefill is writing
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        os.kill(prefill.popen.pid, signal.SIGSTOP)
        try:
            # no renewals: the lease lapses (0.5 s), the quarantine passes (1 s), and the blocks are free again
            deadline = time.monotonic() + 10
            while load(decode.address).used_blocks != 0:
                assert time.monotonic() < deadline, "the stalled request's reservation was never released"
                await asyncio.sleep(0.05)
            # another request takes those blocks; we write them as its prefill worker would, with our own data
            engine, rid, checksum = await asyncio.to_thread(
                take_blocks_and_write, decode.address, prompt, keep
            )
        finally:
            os.kill(prefill.popen.pid, signal.SIGCONT)
        await asyncio.sleep(1.5)  # the resumed prefill worker has every chance to write
        # our data is intact: the decode worker verifies it against our checksum before admitting the request
        await asyncio.to_thread(generate_with_checksum, decode.address, rid, checksum)
        keep.clear()
        engine.close()
        await request

    asyncio.run(scenario())
    assert result["status"] in (502, 503, 504), result
    assert "reservation" in result["body"]["error"]["message"], result
    no_blocks_within(short_leases, 3, "every block to be freed")
    r = httpx.post(
        f"{short_leases.url}/v1/completions",
        json=completion(llama_checkpoint.name, prompt[:50], 3, False),
        timeout=60,
    )
    assert r.status_code == 200, r.text


def take_blocks_and_write(
    address: str, prompt: list[int], keep: threading.Event
) -> tuple[MooncakeEngine, str, int]:
    """Reserve blocks for `prompt` on the decode worker, keep its lease alive until `keep` is cleared (as its
    prefill worker would) and fill the blocks with random KV over Mooncake. Returns (the engine, which must outlive
    the lease: its teardown holds the GIL for a second, the request id, the checksum)."""
    engine = MooncakeEngine("127.0.0.1", "tcp", timeout_s=5)  # first: its start-up holds the GIL a while
    stub = pb_grpc.DecodeStub(grpc.insecure_channel(address))
    rid = "victim"
    dest = stub.Reserve(
        pb.ReserveRequest(request_id=rid, prompt_token_ids=prompt, sampling=SAMPLING)
    ).destination

    def renew() -> None:
        while keep.is_set():
            if stub.Renew(pb.RenewRequest(request_ids=[rid])).held != [rid]:
                return  # taken by Generate (or lost: Generate then fails the test)
            time.sleep(0.05)

    threading.Thread(target=renew, daemon=True).start()
    n = len(dest.block_ids)
    blocks = torch.randn(n, dest.block_nbytes // 4)
    engine.register(blocks)
    (session,) = [e.session_id for e in dest.endpoints if e.protocol == "tcp"]
    src = [blocks.data_ptr() + i * dest.block_nbytes for i in range(n)]
    dst = [dest.base_address + b * dest.block_nbytes for b in dest.block_ids]
    engine.write(session, src, dst, [dest.block_nbytes] * n)
    return engine, rid, kv_checksum(blocks, list(range(n)))


def generate_with_checksum(address: str, rid: str, checksum: int) -> None:
    stub = pb_grpc.DecodeStub(grpc.insecure_channel(address))
    chunks = list(stub.Generate(pb.GenerateRequest(request_id=rid, first_token=7, kv_checksum=checksum)))
    assert chunks[-1].finished
