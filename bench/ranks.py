"""What keeping a parallel worker's ranks in step costs the host per engine step.

    python bench/ranks.py [--ranks 2] [--steps 2000] [--outputs 8]

Each step of a parallel colocated worker, rank 0 broadcasts the queued engine calls and every rank shares its
report (busy, load, and outputs where it has them) over the host's gloo group (`services/worker/ranks.py`). This
runs that exchange between --ranks real processes, for steps with no calls or outputs (a tensor-parallel decode
step: rank 0 has its own outputs) and for steps where every rank sends --outputs streamed outputs (data-parallel
replicas), against the baseline of the two raw collectives the exchange is built on (a 2-integer broadcast and an
all-gather of one report header), measured in the same processes.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _median_us(fn, steps: int) -> float:  # type: ignore[no-untyped-def]
    for _ in range(steps // 10):
        fn()
    dist.barrier()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def _rank(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    from services.engine.engine import LoadCounts, RequestOutput
    from services.worker.ranks import STEP, StepReport, receive_calls, send_calls, share_reports

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    header, heads = torch.zeros(2, dtype=torch.int64), torch.zeros(world * 10, dtype=torch.int64)

    def raw() -> None:
        dist.broadcast(header, src=0)
        dist.all_gather_into_tensor(heads, torch.zeros(10, dtype=torch.int64))

    def exchange(report: StepReport) -> None:
        if rank == 0:
            send_calls(STEP, [], None)
        else:
            receive_calls(None)
        share_reports(report, world, None)

    load = LoadCounts(3, 0, 0, 40, 1000, 123, 45, 0)
    quiet = StepReport([], True, load)
    outputs = [
        RequestOutput(f"req-{i}", [1234], " word", False, None, None, 100, 7, 0) for i in range(args.outputs)
    ]
    streaming = StepReport(outputs, True, load)
    results = {
        "raw": _median_us(raw, args.steps),
        "quiet": _median_us(lambda: exchange(quiet), args.steps),
        "outputs": _median_us(lambda: exchange(streaming), args.steps),
    }
    if rank == 0:
        print(f"{world} ranks on {os.cpu_count()} CPU cores, median of {args.steps} steps")
        print(f"  baseline: raw broadcast + all-gather       {results['raw']:8.0f} us")
        print(
            f"  exchange, no calls or outputs               {results['quiet']:8.0f} us  ({results['quiet'] / results['raw']:.2f}x)"
        )
        print(
            f"  exchange, {args.outputs} outputs from every rank       {results['outputs']:8.0f} us  "
            f"({results['outputs'] / results['raw']:.2f}x)"
        )
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--outputs", type=int, default=8, help="outputs per rank in the streaming case")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(args.ranks, port, args), nprocs=args.ranks)


if __name__ == "__main__":
    main()
