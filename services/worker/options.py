"""The command-line options of a worker (`pdmesh prefill|decode|colocated`); light, so building the `pdmesh`
parser imports no torch."""

from __future__ import annotations

import argparse

from services.transfer.endpoints import PROTOCOLS


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="local Hugging Face checkpoint directory (default: the embedded tiny model)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=0, help="gRPC port (default: a free one, printed at start)"
    )
    parser.add_argument(
        "--address-file", help="write the HOST:PORT the worker serves at to this file once it serves"
    )
    parser.add_argument(
        "--device", default="auto", help="auto, cpu, cuda, cuda:N (several ranks: rank r on GPU N + r)"
    )
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, help="KV blocks (default: sized from memory)")
    parser.add_argument("--kv-cache-memory-gb", type=float)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=2048, help="token budget per step (chunk size)"
    )
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--load-format",
        default="safetensors",
        choices=["safetensors", "dummy"],
        help="dummy: random weights, no checkpoint read (benchmarks; config.json and tokenizer still needed)",
    )
    par = parser.add_argument_group(
        "parallelism (one GPU per rank, all on this host; prefill and decode workers: the same layout on both sides)"
    )
    par.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per replica (default 1)")
    par.add_argument(
        "--dp", type=int, default=1, help="data-parallel attention replicas (default 1); ranks = tp x dp"
    )
    par.add_argument(
        "--ep", type=int, default=1, help="expert-parallel ranks for MoE models: 1 (default) or tp x dp"
    )
    par.add_argument(
        "--ep-dispatch",
        default="auto",
        choices=["auto", "all_to_all", "all_gather", "mori"],
        help="how tokens reach their experts with --dp > 1 (default: all_gather on GPUs)",
    )
    par.add_argument("--tbo", action="store_true", help="two-batch overlap (kept only where it is faster)")
    par.add_argument(
        "--tbo-min-prefill-tokens",
        type=int,
        default=4096,
        help="TBO only for steps of at least this many tokens",
    )
    par.add_argument(
        "--tbo-min-decode-seqs", type=int, default=128, help="TBO only for decode steps of at least this many"
    )
    parser.add_argument(
        "--transfer-protocol",
        default="auto",
        choices=["auto", *PROTOCOLS],
        help="Mooncake transport for KV (auto: nvlink_intra between GPU workers of one host, rdma where "
        "--transfer-device names a NIC, tcp otherwise; chosen per prefill/decode pair)",
    )
    parser.add_argument("--transfer-device", default="", help="RDMA NIC for the rdma protocol, e.g. mlx5_0")
    parser.add_argument(
        "--transfer-host", default="", help="address peers use for KV transfer (default: --host)"
    )
    parser.add_argument(
        "--transfer-timeout", type=float, default=30.0, help="seconds one KV write may take (at least 5)"
    )
    parser.add_argument(
        "--reservation-lease",
        type=float,
        default=10.0,
        help="decode: seconds a reservation is held without a renewal from the prefill worker",
    )
    parser.add_argument(
        "--quarantine", type=float, default=30.0, help="decode: seconds unconfirmed blocks wait"
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM: seconds the requests under way get to finish (new ones are refused)",
    )
