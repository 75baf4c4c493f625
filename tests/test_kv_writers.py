"""KV writers against real Mooncake TCP peers in their own processes: the engine thread never waits on a transfer,
a stalled peer holds up only its own requests, a failure fails its own request alone, and a writer survives a job
that raises."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from services.engine.kv_cache import KVCache, KVLayout
from services.transfer.destination import KvDestination
from services.transfer.endpoints import KvEndpoint
from services.transfer.mooncake_engine import MooncakeEngines, TransferError
from services.transfer.sender import KvSender
from services.transfer.staging import StagingBuffer
from tests.cluster import ROOT

LAYOUT = KVLayout(num_blocks=64, num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float32)
PEER_BLOCKS = 32
PEER = f"""
import sys, torch
from services.transfer.mooncake_engine import MooncakeEngine
engine = MooncakeEngine("127.0.0.1", "tcp", timeout_s=5)
pool = torch.zeros({PEER_BLOCKS}, {LAYOUT.block_nbytes} // 4)
engine.register(pool)
print(engine.session_id, pool.data_ptr(), flush=True)
for line in sys.stdin:  # "i j": print the float32 words of blocks i..j-1, summed exactly as int64 bit patterns
    i, j = map(int, line.split())
    print(int(pool[i:j].view(torch.int32).to(torch.int64).sum()), flush=True)
"""


@dataclass
class Peer:
    proc: subprocess.Popen[str]
    session: str
    base: int

    def sum(self, first: int, end: int) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{first} {end}\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def destination(self, blocks: tuple[int, ...]) -> KvDestination:
        endpoint = KvEndpoint("tcp", self.session)
        return KvDestination((endpoint,), "peer", self.base, LAYOUT.block_nbytes, blocks, 0, "fp")


def start_peer() -> Peer:
    proc = subprocess.Popen(
        [sys.executable, "-c", PEER],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    session, base = proc.stdout.readline().split()
    return Peer(proc, session, int(base))


def stop(pid: int) -> None:
    """SIGSTOP, and wait until the process is stopped: on a loaded machine the signal takes effect a while later,
    and a peer still running could take the writes meant to find it stalled."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, f"process {pid} did not stop"
        time.sleep(0.01)


@pytest.fixture
def peers() -> Iterator[tuple[Peer, Peer]]:
    a, b = start_peer(), start_peer()
    yield a, b
    for p in (a, b):
        os.kill(p.proc.pid, signal.SIGCONT)
        p.proc.kill()
        p.proc.wait()


@pytest.fixture
def sender() -> Iterator[tuple[KvSender, torch.Tensor]]:
    cache = KVCache(LAYOUT, torch.device("cpu"))
    cache.kv.copy_(torch.randn(cache.kv.shape))
    engines = MooncakeEngines("127.0.0.1", ["tcp"], "", timeout_s=5, required=True)
    staging = StagingBuffer(cache.kv, LAYOUT.block_nbytes, num_slots=2, slot_blocks=4)
    s = KvSender(engines, cache.kv, LAYOUT.block_size, LAYOUT.block_nbytes, staging, timeout_s=5)
    yield s, cache.kv
    s.stop()


def words(kv: torch.Tensor, blocks: list[int]) -> int:
    return int(kv[blocks].view(torch.int32).to(torch.int64).sum())


def send(s: KvSender, rid: str, dest: KvDestination, src: list[int]) -> float:
    """Hand a whole prompt to the sender as the engine thread would; returns how long the engine thread spent."""
    started = time.monotonic()
    s.begin(rid, dest, len(src) * LAYOUT.block_size, checksum=False)
    for upto in range(4, len(src) + 1, 4):  # one push per "step" of 4 blocks
        s.push_ready({rid: (src, upto)})
    s.close(rid, src)
    return time.monotonic() - started


def test_a_stalled_peer_delays_only_its_own_requests(sender, peers) -> None:  # type: ignore[no-untyped-def]
    s, kv = sender
    slow, fast = peers
    send(s, "warm", slow.destination((0, 1, 2, 3)), [0, 1, 2, 3])  # the handshake happens while it is alive
    s.wait("warm", 10)
    stop(slow.proc.pid)
    # more work for the stalled peer than there are staging slots; the engine thread never waits for any of it
    spent = send(s, "stuck", slow.destination(tuple(range(4, 20))), list(range(16, 32)))
    spent += send(s, "also-stuck", slow.destination(tuple(range(20, 28))), list(range(32, 40)))
    src = list(range(40, 56))
    spent += send(s, "fine", fast.destination(tuple(range(16))), src)
    assert spent < 0.5, f"the engine thread spent {spent:.2f}s handing over work"
    started = time.monotonic()
    s.wait("fine", 10)
    assert time.monotonic() - started < 2, "the healthy peer's request waited behind the stalled one"
    assert fast.sum(0, 16) == words(kv, src)  # every byte landed where it belongs
    assert not s.requests["stuck"].done.is_set()
    # the stalled peer's requests fail on their own within the write timeout (5 s), with the peer named
    for rid in ("stuck", "also-stuck"):
        with pytest.raises(TransferError, match=slow.session):
            s.wait(rid, 30)
    os.kill(slow.proc.pid, signal.SIGCONT)
    # and the sender goes on serving both peers
    send(s, "after", fast.destination((16, 17, 18, 19)), [1, 2, 3, 4])
    s.wait("after", 10)
    assert fast.sum(16, 20) == words(kv, [1, 2, 3, 4])


def test_a_failing_job_fails_its_request_alone_and_the_writer_goes_on(sender, peers) -> None:  # type: ignore[no-untyped-def]
    s, kv = sender
    peer, _ = peers
    s.begin("broken", peer.destination((0, 1, 2, 3)), 16, checksum=False)
    s.push_ready({"broken": ([0, 1, 999, 3], 4)})  # block 999 does not exist: the gather raises on the writer
    s.close("broken", [0, 1, 999, 3])
    send(s, "good", peer.destination((4, 5, 6, 7)), [8, 9, 10, 11])
    with pytest.raises(TransferError, match="failed"):
        s.wait("broken", 10)
    s.wait("good", 10)
    assert peer.sum(4, 8) == words(kv, [8, 9, 10, 11])
    assert s.requests["good"].error is None


def test_a_lapsed_lease_stops_every_write(sender, peers) -> None:  # type: ignore[no-untyped-def]
    s, _ = sender
    peer, _ = peers
    s.begin("late", peer.destination((0, 1, 2, 3)), 16, checksum=False, lease_until=time.monotonic() - 1)
    s.push_ready({"late": ([4, 5, 6, 7], 4)})
    s.close("late", [4, 5, 6, 7])
    with pytest.raises(TransferError, match="lapsed"):
        s.wait("late", 10)
    assert peer.sum(0, 4) == 0  # nothing was written
