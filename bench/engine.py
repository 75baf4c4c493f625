"""Engine speed on one GPU against the hardware roofline and `transformers`, measured in one run.

    python bench/engine.py [--batches 1,8,32,128,256] [--context 1024] [--prefill 1024,8192,32768] [--out r.json]
                           [--skip-transformers] [--no-prefill-graphs]

The model has Llama-3.1-8B's shape (32 layers, hidden 4096, 32 q / 8 kv heads, MLP 14336, vocab 128256) with
random bf16 weights made on the GPU (no checkpoint is read). Measured first: the GPU's copy bandwidth and bf16
matmul rate, which give each case its roofline:
- decode step at batch B, context C: max(bytes / bandwidth, FLOPs / matmul rate), bytes = every weight once
  (16.06 GB) + the K/V of B x C tokens, FLOPs = 2 x non-embedding params x B + 4 x B x C x layers x q-heads x dim;
- prefill of L tokens: FLOPs = 2 x non-embedding params x L + 2 x L^2 x layers x q-heads x dim (causal), over the
  matmul rate.
pdmesh's decode is timed per engine step (scheduling, CUDA-graph replay, sampling, detokenization included);
transformers' as a forward with its KV cache plus argmax, per step.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "dtype": "bfloat16",
}


def write_model_dir(path: Path, config: dict = LLAMA_8B) -> Path:
    """config.json and a word-level tokenizer covering the whole vocabulary; weights are made on the GPU."""
    from tokenizers import Tokenizer, models

    (path / "config.json").write_text(json.dumps(config))
    vocab = {f"t{i}": i for i in range(config["vocab_size"])}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(path / "tokenizer.json"))
    eos = config["eos_token_id"]
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": f"t{eos}"}))
    return path


def cuda_time(fn, repeats: int, warmup: int = 2) -> float:  # type: ignore[no-untyped-def]
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def hardware() -> dict[str, float]:
    nbytes = 2 << 30
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_s = cuda_time(lambda: dst.copy_(src), 10, 3)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_s = cuda_time(lambda: a @ b, 10, 3)
    return {"bandwidth": 2 * nbytes / copy_s, "matmul_flops": 2 * 8192**3 / mm_s}


def params() -> tuple[int, int]:
    c = LLAMA_8B
    h, i, v, layers = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
    total = layers * per_layer + 2 * v * h + h
    return total, total - v * h  # all, and without the embedding table (a lookup, no FLOPs)


def decode_roofline(hw: dict[str, float], batch: int, context: int) -> float:
    c = LLAMA_8B
    total, compute = params()
    kv_bytes = batch * context * c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * c["head_dim"] * 2
    flops = (
        2 * compute * batch
        + 4 * batch * context * c["num_hidden_layers"] * c["num_attention_heads"] * c["head_dim"]
    )
    return max((2 * total + kv_bytes) / hw["bandwidth"], flops / hw["matmul_flops"])


def prefill_roofline(hw: dict[str, float], tokens: int) -> float:
    c = LLAMA_8B
    _, compute = params()
    attention = 2 * tokens**2 * c["num_hidden_layers"] * c["num_attention_heads"] * c["head_dim"]
    return (2 * compute * tokens + attention) / hw["matmul_flops"]


def bench_pdmesh(
    model_dir: Path,
    batches: list[int],
    context: int,
    prefills: list[int],
    steps: int,
    profile: bool = False,
    kv_gb: float = 48,
    extra: Callable[[Any], None] | None = None,
    prefill_graphs: bool = True,
) -> dict:
    """Decode steps at each batch and prefills of each length through the engine; `extra(engine)` runs last."""
    from services.engine import Engine, EngineConfig, SamplingParams

    engine = Engine(
        EngineConfig(
            model=str(model_dir),
            load_format="dummy",
            dtype="bfloat16",
            max_num_seqs=max(batches),
            max_num_batched_tokens=max(prefills),
            max_model_len=max(max(prefills), context + steps + 8) + 16,
            kv_cache_memory_gb=kv_gb,
            enable_prefix_caching=False,
            progress=True,
            prefill_graphs=prefill_graphs,
        )
    )
    gen = torch.Generator().manual_seed(0)
    results: dict = {"decode_ms": {}, "decode_forward_ms": {}, "prefill_s": {}, "graph_steps": 0}
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]

    def prompt(n: int) -> list[int]:
        return torch.randint(1000, vocab - 1000, (n,), generator=gen).tolist()

    rid = 0
    for batch in batches:
        ids = []
        for _ in range(batch):
            rid += 1
            engine.add_request(
                f"d{rid}",
                prompt(context),
                SamplingParams(max_tokens=steps + 20, ignore_eos=True, temperature=0),
            )
            ids.append(f"d{rid}")
        while any(engine.seqs[i].num_output_tokens == 0 for i in ids):  # prefill everything first
            engine.step()
        for _ in range(3):
            engine.step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        results["decode_ms"][batch] = (time.perf_counter() - start) / steps * 1e3
        graphs = engine.runner.graphs
        bucket = graphs.bucket(batch) if graphs is not None else None
        if graphs is not None and bucket is not None:  # the GPU's share of a step: one replay
            replay = graphs.graphs[bucket, False].replay
            results["decode_forward_ms"][batch] = cuda_time(replay, 10) * 1e3
            if profile:
                print_profile(replay, engine.step)
        for i in ids:
            engine.abort(i)
        forward = results["decode_forward_ms"].get(batch, float("nan"))
        print(
            f"pdmesh decode batch {batch}: {results['decode_ms'][batch]:.2f} ms/step (replay {forward:.2f} ms)"
        )
    for tokens in prefills:
        times = []
        for _ in range(3):
            rid += 1
            engine.add_request(f"p{rid}", prompt(tokens), SamplingParams(max_tokens=1, temperature=0))
            torch.cuda.synchronize()
            start = time.perf_counter()
            while engine.has_unfinished():
                engine.step()
            times.append(time.perf_counter() - start)
        results["prefill_s"][tokens] = min(times)
        print(f"pdmesh prefill {tokens}: {min(times) * 1e3:.1f} ms", flush=True)
    results["graph_steps"] = engine.runner.num_graph_steps
    if extra is not None:
        extra(engine)
    del engine
    torch.cuda.empty_cache()
    return results


def print_profile(replay, step) -> None:  # type: ignore[no-untyped-def]
    """The GPU kernels of a few graph replays and one engine step, busiest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            replay()
        step()
        torch.cuda.synchronize()
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=70),
        flush=True,
    )


def bench_transformers(batches: list[int], context: int, prefills: list[int], steps: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in LLAMA_8B.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cuda").to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    results: dict = {"decode_ms": {}, "prefill_s": {}}
    with torch.no_grad():
        for batch in batches:
            results["decode_ms"][batch] = _transformers_decode(model, batch, context, steps)
            print(f"transformers decode batch {batch}: {results['decode_ms'][batch]:.2f} ms/step", flush=True)
            torch.cuda.empty_cache()
        for tokens in prefills:
            ids = torch.randint(1000, 120000, (1, tokens), device="cuda")
            results["prefill_s"][tokens] = cuda_time(lambda i=ids: model(i, logits_to_keep=1), 3, 1)
            print(f"transformers prefill {tokens}: {results['prefill_s'][tokens] * 1e3:.1f} ms", flush=True)
    return results


def _transformers_decode(model, batch: int, context: int, steps: int, vocab: int = 128256) -> float:  # type: ignore[no-untyped-def]
    ids = torch.randint(1000, vocab - 1000, (batch, context), device="cuda")
    out = model(ids, use_cache=True, logits_to_keep=1)
    state = {"cache": out.past_key_values, "next": out.logits[:, -1].argmax(-1, keepdim=True)}

    def step() -> None:
        o = model(state["next"], past_key_values=state["cache"], use_cache=True)
        state["next"] = o.logits[:, -1].argmax(-1, keepdim=True)

    return cuda_time(step, steps, 3) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32,128,256")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prefill", default="1024,8192,32768")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--no-prefill-graphs", action="store_true", help="run prefills eagerly")
    ap.add_argument("--profile", action="store_true", help="print the top GPU kernels of each decode batch")
    ap.add_argument("--out", help="write the numbers as JSON here")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    prefills = [int(p) for p in args.prefill.split(",")]
    hw = hardware()
    print(
        f"GPU: {torch.cuda.get_device_name()}; copy bandwidth {hw['bandwidth'] / 1e12:.2f} TB/s, "
        f"bf16 matmul {hw['matmul_flops'] / 1e12:.0f} TFLOP/s; weights {2 * params()[0] / 1e9:.2f} GB",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        ours = bench_pdmesh(
            write_model_dir(Path(tmp)),
            batches,
            args.context,
            prefills,
            args.steps,
            args.profile,
            prefill_graphs=not args.no_prefill_graphs,
        )
    theirs = (
        None if args.skip_transformers else bench_transformers(batches, args.context, prefills, args.steps)
    )

    print(f"\nDecode, context {args.context} tokens (ms per step)")
    header = ["batch", "pdmesh", "(replay)", "roofline", "% of roof", "transformers", "speed-up"]
    print("".join(f"{h:>13}" for h in header))
    for b in batches:
        roof = decode_roofline(hw, b, args.context + args.steps // 2) * 1e3
        ours_ms, replay_ms = ours["decode_ms"][b], ours["decode_forward_ms"].get(b, float("nan"))
        hf = theirs["decode_ms"][b] if theirs else float("nan")
        row = [
            f"{b}",
            f"{ours_ms:.2f}",
            f"{replay_ms:.2f}",
            f"{roof:.2f}",
            f"{roof / ours_ms * 100:.0f}%",
            f"{hf:.2f}",
            f"{hf / ours_ms:.1f}x",
        ]
        print("".join(f"{c:>13}" for c in row))
    print("\nPrefill (s)")
    print(
        f"{'tokens':>6} {'pdmesh':>9} {'roofline':>9} {'% of matmul':>12} {'transformers':>13} {'speed-up':>9}"
    )
    for t in prefills:
        roof = prefill_roofline(hw, t)
        ours_s = ours["prefill_s"][t]
        hf = theirs["prefill_s"][t] if theirs else float("nan")
        print(
            f"{t:>6} {ours_s:>9.3f} {roof:>9.3f} {roof / ours_s * 100:>11.0f}% {hf:>13.3f} {hf / ours_s:>8.2f}x"
        )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"hardware": hw, "pdmesh": ours, "transformers": theirs, "args": vars(args)}, indent=2)
        )


if __name__ == "__main__":
    main()
