"""KV transfer throughput: pdmesh's path (gather -> fence -> coalesced write, chunk by chunk, on the destination's
writer thread) against raw Mooncake `batch_transfer_sync_write` of the same bytes, between two processes.

    python bench/transfer.py --device cpu                                          # here
    python bench/transfer.py --device cuda --layers 32 ...                         # GPU to GPU over TCP
    python bench/transfer.py --device cuda --layers 32 --protocol nvlink_intra ... # CUDA IPC (one host)

The receiver process holds a KV pool registered with Mooncake, as a decode worker does; the sender holds a KV
cache and a staging buffer, as a prefill worker does. Both runs move the prompt's blocks into the same
destination blocks; the receiver checks the bytes that landed against the sender's checksum.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.engine.config import DTYPES
from services.engine.kv_cache import KVCache, KVLayout
from services.transfer.checksum import kv_checksum
from services.transfer.destination import KvDestination
from services.transfer.endpoints import KvEndpoint
from services.transfer.mooncake_engine import MooncakeEngine, MooncakeEngines
from services.transfer.peer import coalesce
from services.transfer.sender import KvSender
from services.transfer.staging import StagingBuffer


def layout(args: argparse.Namespace, num_blocks: int) -> KVLayout:
    return KVLayout(
        num_blocks, args.layers, args.block_size, args.kv_heads, args.head_dim, DTYPES[args.dtype]
    )


def receiver(args: argparse.Namespace) -> None:
    device = torch.device(args.receiver_device or args.device)
    num_blocks = 2 * -(-args.prompt_tokens // args.block_size)
    cache = KVCache(layout(args, num_blocks), device)
    engine = MooncakeEngine("127.0.0.1", args.protocol, timeout_s=300)
    engine.register(cache.kv)
    print(json.dumps({"session": engine.session_id, "base": cache.kv.data_ptr()}), flush=True)
    for line in sys.stdin:  # "checksum <ids...>" requests until the sender closes stdin
        ids = [int(x) for x in line.split()[1:]]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        print(json.dumps({"checksum": kv_checksum(cache.kv, ids)}), flush=True)
        cache.kv.zero_()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", default="sender", choices=["sender", "receiver"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--receiver-device", help="default: --device (cuda:1 puts the receiver on a second GPU)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--prompt-tokens", type=int, default=8192)
    ap.add_argument("--chunk-tokens", type=int, default=2048, help="prefill chunk: blocks pushed per push")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--protocol", default="tcp", choices=["tcp", "nvlink_intra"], help="Mooncake transport")
    args = ap.parse_args()
    if args.role == "receiver":
        receiver(args)
        return

    peer = subprocess.Popen(
        [sys.executable, __file__, "--role", "receiver", *sys.argv[1:]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert peer.stdin is not None and peer.stdout is not None
    info = json.loads(peer.stdout.readline())
    device = torch.device(args.device)
    blocks = -(-args.prompt_tokens // args.block_size)
    cache = KVCache(layout(args, 2 * blocks), device)
    cache.kv.copy_(torch.randn(cache.kv.shape, dtype=torch.float32).to(cache.kv.dtype))
    nbytes = cache.layout.block_nbytes
    chunk_blocks = args.chunk_tokens // args.block_size
    engines = MooncakeEngines("127.0.0.1", [args.protocol], "", timeout_s=300, required=True)
    engine = engines.by_protocol[args.protocol]
    staging = StagingBuffer(cache.kv, nbytes, num_slots=4, slot_blocks=chunk_blocks)
    sender = KvSender(engines, cache.kv, args.block_size, nbytes, staging, timeout_s=300)
    src_blocks = list(range(blocks, 2 * blocks))  # where a prefill worker's blocks would be
    dst_blocks = tuple(range(blocks))
    endpoint = KvEndpoint(args.protocol, info["session"])
    dest = KvDestination((endpoint,), engines.host_id, info["base"], nbytes, dst_blocks, 0, "bench")
    raw_src = cache.kv[
        blocks:
    ].contiguous()  # the same bytes, already contiguous and registered: the best case
    engine.register(raw_src)

    def verify() -> None:
        assert peer.stdin is not None and peer.stdout is not None
        peer.stdin.write("checksum " + " ".join(map(str, dst_blocks)) + "\n")
        peer.stdin.flush()
        got = json.loads(peer.stdout.readline())["checksum"]
        assert got == kv_checksum(cache.kv, src_blocks), "the bytes that landed differ from the bytes sent"

    def raw() -> float:
        src, dst, lengths = [], [], []
        for start in range(0, blocks, chunk_blocks):
            n = min(chunk_blocks, blocks - start)
            s, d, ln = coalesce(
                raw_src.data_ptr() + start * nbytes,
                [dest.address(i) for i in range(start, start + n)],
                nbytes,
            )
            src += s
            dst += d
            lengths += ln
        started = time.perf_counter()
        engine.write(endpoint.session_id, src, dst, lengths)
        return time.perf_counter() - started

    def pdmesh(i: int) -> float:
        rid = f"r{i}"
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        sender.begin(rid, dest, args.prompt_tokens, checksum=False)
        for done in range(chunk_blocks, blocks + chunk_blocks, chunk_blocks):  # one push per prefill chunk
            sender.push_ready({rid: (src_blocks, min(done, blocks))})
        sender.close(rid, src_blocks)
        sender.wait(rid, 300)
        elapsed = time.perf_counter() - started
        sender.forget(rid)
        return elapsed

    total = blocks * nbytes
    raw()
    pdmesh(-1)  # warm-up: connections, registrations
    raw_times, ours = [], []
    for i in range(args.repeats):
        raw_times.append(raw())
        verify()
        ours.append(pdmesh(i))
        verify()
    sender.stop()
    peer.stdin.close()
    peer.wait(timeout=30)
    r, o = statistics.median(raw_times), statistics.median(ours)
    print(
        f"KV transfer, {args.device} -> {args.receiver_device or args.device} over Mooncake {args.protocol}, "
        "two processes"
    )
    print(
        f"  {blocks} blocks of {nbytes / 2**20:.2f} MiB ({total / 2**30:.2f} GiB: {args.prompt_tokens} tokens, "
        f"{args.layers} layers, {args.kv_heads} kv heads x {args.head_dim}, {args.dtype}), "
        f"pushed in chunks of {args.chunk_tokens} tokens; median of {args.repeats}"
    )
    print(f"  raw batch_transfer_sync_write (baseline): {total / r / 1e9:7.2f} GB/s  ({r * 1e3:8.1f} ms)")
    print(f"  pdmesh KV path                          : {total / o / 1e9:7.2f} GB/s  ({o * 1e3:8.1f} ms)")
    print(f"  ratio pdmesh / raw                      : {r / o:7.2f}x  (bytes verified by checksum each run)")


if __name__ == "__main__":
    main()
