"""The latent (MLA) decode attention kernel on one GPU, by tile config and split count, against its roofline.

    python bench/latent_decode.py [--batches 32,128,256] [--context 1024] [--heads 16]

DeepSeek-V2-Lite's latent (512 compressed + 64 rotary columns, bf16, 16 query heads by default), every sequence
`--context` tokens long in a shuffled paged cache. For each batch: the kernel at its default config and split
count, then each (BLOCK_N, warps, stages) x splits of a small grid, as CUDA-graph replays; the roofline is the
latents' bytes over the copy bandwidth measured first (the query and output are negligible beside them). The
fastest config is checked against the default's output before it is reported.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.moe_experts import replay_us

VALUE, ROPE, BLOCK_SIZE = 512, 64, 16
CONFIGS = [
    (n, w, s) for n, w, s in itertools.product((16, 32, 64), (4, 8), (1, 2, 3)) if not (n == 64 and s == 3)
]


def main() -> None:
    from bench.engine import hardware
    from services.engine.kernels.decode_attention import num_splits_for
    from services.engine.kernels.latent_decode import latent_decode_attention

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="32,128,256")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--splits", default="1,2,4,8")
    args = ap.parse_args()
    bandwidth = hardware()["bandwidth"]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"GPU: {torch.cuda.get_device_name()}; copy bandwidth {bandwidth / 1e12:.2f} TB/s; {sms} SMs")
    scale = (VALUE + ROPE) ** -0.5
    for batch in [int(b) for b in args.batches.split(",")]:
        per_seq = args.context // BLOCK_SIZE
        cache = torch.randn(batch * per_seq, BLOCK_SIZE, 1, VALUE + ROPE, device="cuda", dtype=torch.bfloat16)
        tables = torch.randperm(batch * per_seq, device="cuda", dtype=torch.int32).view(batch, per_seq)
        lens = torch.full((batch,), args.context, device="cuda", dtype=torch.int32)
        q = torch.randn(batch, args.heads, VALUE + ROPE, device="cuda", dtype=torch.bfloat16)
        q_main, q_rope = q[..., :VALUE], q[..., VALUE:]
        roof = cache.numel() * cache.element_size() / bandwidth * 1e6

        run = functools.partial(latent_decode_attention, q_main, q_rope, cache, tables, lens, scale, sms)

        default_splits = num_splits_for(batch, 1, sms, per_sm=1)
        base = replay_us(functools.partial(run, (32, 4, 2), None))
        print(
            f"\nbatch {batch}, context {args.context}: roofline {roof:.1f} µs; default (32, 4, 2) x "
            f"{default_splits} splits {base:.1f} µs ({roof / base:.0%})"
        )
        results = []
        for config in CONFIGS:
            for splits in sorted({default_splits, *(int(s) for s in args.splits.split(","))}):
                try:
                    us = replay_us(functools.partial(run, config, splits))
                except Exception as e:  # out of shared memory or registers for this tile: skip it
                    print(f"  {config} x {splits}: {type(e).__name__}")
                    break
                results.append((us, config, splits))
                print(f"  {config} x {splits:>2}: {us:7.1f} µs ({roof / us:.0%})", flush=True)
        us, config, splits = min(results)
        diff = (run(config, splits).float() - run((32, 4, 2), None).float()).abs().max().item()
        assert diff < 0.02, f"{config} x {splits} differs from the default by {diff}"
        print(f"best: {config} x {splits} {us:.1f} µs ({roof / us:.0%}), {base / us:.2f}x the default")


if __name__ == "__main__":
    main()
