"""Two-batch overlap (TBO) on several GPUs: expert-parallel MoE with data-parallel attention, TBO off vs on.

    python bench/tbo.py [--model qwen3_30b_a3b|deepseek_v3] [--gpus 2] [--layers 16]
                        [--prefill 4096,8192,16384] [--decode 64,128,256] [--context 1024] [--out r.json]

Models, `--layers` of them with random bf16 weights made on the GPUs:
- qwen3_30b_a3b: Qwen3-30B-A3B's shape (hidden 2048, 32 q / 4 kv heads of 128, 128 experts of 768, top-8, vocab
  151936; 48 layers);
- deepseek_v3: DeepSeek-V3's layers (hidden 7168, 128 heads of MLA with a 512 + 64 latent and a 1536 query rank,
  256 experts of 2048 + 1 shared, top-8 of 8 groups (4 chosen), sigmoid scores with the correction bias; every
  layer is an MoE layer here: the checkpoint's first three dense layers are left out).
One rank per GPU (`--gpus`, default all): each serves its own batch (data-parallel attention) and holds 1/N of the
experts (EP=N); tokens reach their experts by the fixed-shape dispatch (all-gather, then a reduce-scatter of the
expert sums) over NCCL.

- prefill: one forward of T tokens per rank (prompts of --prompt-len tokens), eager;
- decode: one step at batch B per rank, --context tokens of context each, replayed from CUDA graphs (the split
  graph interleaves the two halves' forwards);
- each case runs with TBO off (the baseline, measured in the same run), forced on, and as the engine's default
  thresholds decide (auto); speed-up = off time / on time;
- overlap, from a profiler trace of each case: the share of the communication kernels' time during which a
  compute kernel ran on the same GPU, and the communication kernels' share of the step with TBO off (which bounds
  what TBO can hide: at most 1 / (1 - share)).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import write_model_dir

QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "dtype": "bfloat16",
}
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 0,
    "moe_layer_freq": 1,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "n_group": 8,
    "topk_group": 4,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "dtype": "bfloat16",
}
MODELS = {"qwen3_30b_a3b": QWEN3_30B_A3B, "deepseek_v3": DEEPSEEK_V3}
BLOCK = 16


def prefill_inputs(tokens: int, prompt_len: int, rank: int):  # type: ignore[no-untyped-def]
    """tokens / prompt_len whole prompts, each in its own blocks from block 0 on."""
    from services.engine.runner import HostInputs

    n, per = tokens // prompt_len, prompt_len // BLOCK
    tables = np.arange(n * per, dtype=np.int32).reshape(n, per)
    slots = (tables.astype(np.int64)[:, :, None] * BLOCK + np.arange(BLOCK)).reshape(-1)
    ids = np.random.default_rng(rank).integers(1000, 120000, n * prompt_len)
    positions = np.tile(np.arange(prompt_len, dtype=np.int64), n)
    return HostInputs(ids, positions, slots, [prompt_len] * n, [prompt_len] * n, tables, [], [], tokens)


def decode_inputs(batch: int, context: int, rank: int):  # type: ignore[no-untyped-def]
    """One new token per sequence at position context - 1; sequence i holds blocks [i * per, (i + 1) * per)."""
    from services.engine.runner import HostInputs

    per = -(-context // BLOCK)
    tables = np.arange(batch * per, dtype=np.int32).reshape(batch, per)
    pos = context - 1
    slots = tables[:, pos // BLOCK].astype(np.int64) * BLOCK + pos % BLOCK
    ids = np.random.default_rng(rank).integers(1000, 120000, batch)
    positions = np.full(batch, pos, dtype=np.int64)
    return HostInputs(
        ids, positions, slots, [1] * batch, [context] * batch, tables, list(range(batch)), [], 0
    )


def cuda_time(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    """Seconds per call; both ranks start together and every call's collectives pair up."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def overlap(fn, repeats: int = 3, top: bool = False) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Communication kernels' time per call, and the share of it during which a compute kernel ran."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    dist.barrier()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    if top:
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    comm, compute = [], []
    for e in prof.events():
        if e.device_type != DeviceType.CUDA or e.time_range.end <= e.time_range.start:
            continue
        span = (e.time_range.start, e.time_range.end)
        (comm if "nccl" in e.name.lower() else compute).append(span)
    merged: list[list[float]] = []
    for s, t in sorted(compute):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], t)
        else:
            merged.append([s, t])
    starts = [m[0] for m in merged]
    total = covered = 0.0
    for s, t in comm:
        total += t - s
        i = max(0, int(np.searchsorted(starts, s)) - 1)
        while i < len(merged) and merged[i][0] < t:
            covered += max(0.0, min(t, merged[i][1]) - max(s, merged[i][0]))
            i += 1
    busy = sum(t - s for s, t in merged)
    return {
        "comm_ms": total / repeats / 1e3,
        "overlapped": covered / total if total else 0.0,
        "compute_ms": busy / repeats / 1e3,
    }


def worker(rank: int, port: int, model_dir: str, args: argparse.Namespace, out: str) -> None:
    torch.cuda.set_device(rank)
    from services.engine import Engine, EngineConfig
    from services.engine.parallel.state import ParallelConfig
    from services.engine.tbo import TBOConfig

    decodes, prefills = args.decode_batches, args.prefill_tokens
    blocks = max(max(decodes) * -(-args.context // BLOCK), max(prefills) // BLOCK) + 64
    engine = Engine(
        EngineConfig(
            model=model_dir,
            load_format="dummy",
            dtype="bfloat16",
            parallel=ParallelConfig(dp=args.gpus, ep=args.gpus),
            rank=rank,
            dist_init_method=f"tcp://127.0.0.1:{port}",
            tbo=True,
            tbo_min_decode_seqs=min(decodes),  # split graphs are captured from here up
            tbo_min_prefill_tokens=min(prefills),  # start-up calibration times prefill from here up
            block_size=BLOCK,
            num_blocks=blocks,
            max_model_len=max(args.prompt_len, args.context) + 64,
            max_num_seqs=max(decodes),
            max_num_batched_tokens=max(prefills),
            cuda_graph_sizes=tuple(decodes),
            enable_prefix_caching=False,
            progress=rank == 0,
        )
    )
    runner = engine.runner
    # auto: what the engine's start-up calibration kept
    modes = {"off": TBOConfig(False), "on": TBOConfig(True, 1, 1), "auto": runner.tbo}
    engine.kv_cache.kv.normal_()  # attention over real numbers (the cache starts zeroed)
    results: dict = {
        "prefill": {},
        "decode": {},
        "calibration": {f"{kind} {size}": times for (kind, size), times in engine.tbo_calibration.items()},
        "peer_access": torch.cuda.can_device_access_peer(0, 1),
    }

    def case(kind: str, size: int, fn) -> None:  # type: ignore[no-untyped-def]
        row: dict = {}
        for mode, cfg in modes.items():
            runner.tbo = cfg
            before = runner.num_tbo_steps
            row[mode] = cuda_time(fn, args.repeats)
            row[f"{mode}_split"] = runner.num_tbo_steps > before
            if mode != "auto":
                row[f"{mode}_profile"] = overlap(fn, top=args.profile and rank == 0)
        results[kind][size] = row
        if rank == 0:
            print(
                f"{kind} {size}/rank: off {row['off'] * 1e3:.2f} ms, on {row['on'] * 1e3:.2f} ms "
                f"({row['off'] / row['on']:.2f}x), auto {'TBO' if row['auto_split'] else 'no TBO'}; comm "
                f"{row['off_profile']['comm_ms']:.2f} ms, overlapped {row['on_profile']['overlapped']:.0%}",
                flush=True,
            )

    with torch.inference_mode():
        for tokens in prefills:
            h = prefill_inputs(tokens, args.prompt_len, rank)
            runner.tbo = modes["off"]
            ref = runner.forward_eager(h).float()
            runner.tbo = modes["on"]
            diff = (runner.forward_eager(h).float() - ref).abs().max().item()
            case("prefill", tokens, lambda h=h: runner.forward_eager(h))
            results["prefill"][tokens]["max_abs_diff"] = diff
        for batch in decodes:
            h = decode_inputs(batch, args.context, rank)
            case("decode", batch, lambda h=h: runner.sample_logits(h))
        results["graph_steps"] = runner.num_graph_steps
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    torch.cuda.synchronize()
    os._exit(0)  # NOTE: skips the NCCL teardown, which was seen to hang once both ranks had finished


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3_30b_a3b", choices=list(MODELS))
    ap.add_argument("--gpus", type=int, default=0, help="ranks, one per GPU (default: every GPU)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--prefill", default="4096,8192,16384", help="tokens per rank")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--decode", default="64,128,256", help="sequences per rank")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--profile", action="store_true", help="print each case's busiest GPU kernels")
    ap.add_argument("--out", help="write the numbers as JSON here")
    args = ap.parse_args()
    args.prefill_tokens = [int(t) for t in args.prefill.split(",")]
    args.decode_batches = [int(b) for b in args.decode.split(",")]
    args.gpus = args.gpus or torch.cuda.device_count()
    if not 2 <= args.gpus <= torch.cuda.device_count():
        sys.exit(f"bench/tbo.py needs 2 or more GPUs (--gpus {args.gpus}; {torch.cuda.device_count()} here)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config = dict(MODELS[args.model], num_hidden_layers=args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp), config)
        out = Path(tmp) / "results.json"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(worker, args=(port, str(model_dir), args, str(out)), nprocs=args.gpus)
        results = json.loads(out.read_text())
    print(
        f"\n{torch.cuda.get_device_name()} x{args.gpus}, {args.model}, EP={args.gpus} + data-parallel attention, "
        f"{args.layers} layers"
    )
    print(
        f"GPU peer access: {results['peer_access']}; start-up calibration (off s, on s): {results['calibration']}"
    )
    header = ["per rank", "TBO off ms", "TBO on ms", "speed-up", "auto", "comm share", "overlapped"]
    for kind in ("prefill", "decode"):
        print(f"\n{kind}")
        print("".join(f"{h:>13}" for h in header))
        for size, row in results[kind].items():
            share = row["off_profile"]["comm_ms"] / (row["off"] * 1e3)
            best = "on" if row["on"] < row["off"] else "off"
            auto = "on" if row["auto_split"] else "off"
            if row["auto_split"] == (best == "on"):
                auto += " (best)"
            cells = [
                size,
                f"{row['off'] * 1e3:.2f}",
                f"{row['on'] * 1e3:.2f}",
                f"{row['off'] / row['on']:.2f}x",
                auto,
                f"{share:.0%}",
                f"{row['on_profile']['overlapped']:.0%}",
            ]
            print("".join(f"{c:>13}" for c in cells))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), **results}, indent=2))


if __name__ == "__main__":
    main()
