"""The routed experts of one MoE layer on one GPU: pdmesh's kernels against PyTorch's grouped GEMM, by batch.

    python bench/moe_experts.py [--models qwen3_30b_a3b,deepseek_v2_lite] [--tokens 1,4,16,32,128,256,1024,8192]

For each number of tokens: route them (uniform random logits), then time, as CUDA-graph replays:
- pdmesh: `Experts._forward_fused` (pair order, two Triton expert GEMMs with silu fused, the weighted combine);
- baseline: the same pair order, then PyTorch's grouped GEMM (`torch.nn.functional.grouped_mm`) for each
  projection with a gather before and silu between, put back in pair order, and the same combine;
- the roofline: bytes of the experts the tokens touch over the copy bandwidth (both projections).
The two results are compared (max abs difference) before timing.

    python bench/moe_experts.py --sweep [--tokens 1,4,16]

times each projection's expert GEMM alone over a grid of tile configs (BLOCK_M, BLOCK_N, BLOCK_K, warps,
stages), against `gemm_config`'s choice in the same run, and prints the fastest (checked equal to the default's
output).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # experts, hidden, expert intermediate, top-k
    "qwen3_30b_a3b": (128, 2048, 768, 8),
    "deepseek_v2_lite": (64, 2048, 1408, 6),
}


def replay_us(fn) -> float:  # type: ignore[no-untyped-def]
    """Microseconds per call of fn captured in a CUDA graph."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
        with torch.cuda.graph(graph):
            fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(graph.replay, warmup=5, rep=50) * 1e3


def measure(experts, tokens: int, k: int, bandwidth: float) -> tuple[int, float, float, float]:  # type: ignore[no-untyped-def]
    """(experts touched, roofline µs, pdmesh µs, grouped-GEMM µs) for one layer's experts at `tokens`."""
    from services.engine.kernels.activation import silu_and_mul
    from services.engine.kernels.moe import combine, expert_order
    from services.engine.kernels.moe_route import route_topk
    from services.engine.models.moe import grouped_mm

    num, hidden, inter = experts.num_experts, experts.w2.shape[1], experts.inter
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(tokens, num, device="cuda", dtype=torch.bfloat16)
    weights, ids = route_topk(logits, k, False, True, 1.0)

    def ours() -> torch.Tensor:
        return experts._forward_fused(x, weights, ids)

    def grouped() -> torch.Tensor:
        order, ends = expert_order(ids, 0, num)
        h = grouped_mm(x[order // k], experts.w13.mT, ends)
        h = grouped_mm(silu_and_mul(h), experts.w2.mT, ends)
        return combine(torch.empty_like(h).index_copy_(0, order, h), ids, weights, 0, num, x.dtype)

    diff = (ours().float() - grouped().float()).abs().max().item()
    assert diff < 0.05, f"at {tokens} tokens the outputs differ by {diff}"
    touched = ids.unique().numel()
    roof = touched * 3 * hidden * inter * 2 / bandwidth * 1e6
    return touched, roof, replay_us(ours), replay_us(grouped)


SWEEP = [  # decode sizes: one 16-row tile, the weights are the traffic
    (16, n, k, w, st)
    for n in (16, 32, 64, 128)
    for k in (64, 128, 256)
    for w in (2, 4)
    for st in (3, 4)
    if not (k == 256 and st == 4)
]
SWEEP_LARGE = [  # prefill sizes: the matmul is the work
    (m, n, k, w, st)
    for m in (64, 128)
    for n in (64, 128, 256)
    for k in (32, 64)
    for w in (4, 8)
    for st in (3, 4)
    if not (m == 128 and n == 256 and (k == 64 or w == 4))
]


def sweep(experts, tokens: int, k: int, bandwidth: float) -> None:  # type: ignore[no-untyped-def]
    """Each projection's GEMM alone: the default config, then SWEEP; the fastest of each."""
    from services.engine.kernels.moe import expert_gemm, expert_order, gemm_config
    from services.engine.kernels.moe_route import route_topk

    num, hidden, inter = experts.num_experts, experts.w2.shape[1], experts.inter
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    _, ids = route_topk(torch.randn(tokens, num, device="cuda", dtype=torch.bfloat16), k, False, True, 1.0)
    order, ends = expert_order(ids, 0, num)
    h = expert_gemm(x, order, ends, experts.w13, top_k=k, silu=True)
    touched = ids.unique().numel()
    for name, a, w, top_k, silu, nbytes in (
        ("w13", x, experts.w13, k, True, touched * 2 * hidden * inter * 2),
        ("w2", h, experts.w2, 1, False, touched * hidden * inter * 2),
    ):
        roof = nbytes / bandwidth * 1e6
        run = functools.partial(expert_gemm, a, order, ends, w, top_k, silu)
        default = gemm_config(order.shape[0], num)
        base = replay_us(functools.partial(run, default))
        want = run(default).float()
        best = (base, default)
        for config in SWEEP if tokens < 256 else SWEEP_LARGE:
            try:
                us = replay_us(functools.partial(run, config))
            except Exception as e:  # a tile that does not fit: skip it
                print(f"    {config}: {type(e).__name__}")
                continue
            if us < best[0] and (run(config).float() - want).abs().max().item() < 0.05:
                best = (us, config)
        us, config = best
        print(
            f"  {tokens:>6} tokens {name:>4}: roofline {roof:6.1f} µs; default {default} {base:6.1f} µs "
            f"({roof / base:.0%}); best {config} {us:6.1f} µs ({roof / us:.0%})",
            flush=True,
        )


def main() -> None:
    from bench.engine import hardware
    from services.engine.models.moe import Experts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--tokens", default="1,4,16,32,128,256,1024,8192")
    ap.add_argument("--sweep", action="store_true", help="search each projection's tile config")
    args = ap.parse_args()
    bandwidth = hardware()["bandwidth"]
    print(f"GPU: {torch.cuda.get_device_name()}; copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    for name in args.models.split(","):
        num, hidden, inter, k = SHAPES[name]
        experts = Experts(num, hidden, inter).cuda()
        experts.w13.data = torch.randn(num, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
        experts.w2.data = torch.randn(num, hidden, inter, device="cuda", dtype=torch.bfloat16) * 0.02
        print(f"\n{name}: {num} experts of {inter}, hidden {hidden}, top-{k} (µs per layer)")
        if args.sweep:
            for tokens in [int(t) for t in args.tokens.split(",")]:
                sweep(experts, tokens, k, bandwidth)
            continue
        header = ["tokens", "touched", "roofline", "pdmesh", "of roof", "grouped", "speed-up"]
        print("".join(f"{h:>10}" for h in header))
        for tokens in [int(t) for t in args.tokens.split(",")]:
            touched, roof, ours, base = measure(experts, tokens, k, bandwidth)
            row = [
                tokens,
                touched,
                f"{roof:.1f}",
                f"{ours:.1f}",
                f"{roof / ours:.0%}",
                f"{base:.1f}",
                f"{base / ours:.2f}x",
            ]
            print("".join(f"{c:>10}" for c in row), flush=True)


if __name__ == "__main__":
    main()
