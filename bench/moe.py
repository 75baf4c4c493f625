"""MoE and MLA models on one GPU against the hardware roofline and `transformers`, measured in one run.

    python bench/moe.py [--models qwen3_30b_a3b,deepseek_v2_lite] [--batches 1,32,128,256] [--context 1024]
                        [--prefill 1024,8192,32768] [--skip-transformers] [--out r.json]

Full-depth shapes with random bf16 weights made on the GPU (no checkpoint is read):
- qwen3_30b_a3b: Qwen3-30B-A3B (48 layers, hidden 2048, 32 q / 4 kv heads, 128 experts of 768, top-8);
- deepseek_v2_lite: DeepSeek-V2-Lite (27 layers, hidden 2048, 16 heads of MLA with a 512 + 64 latent, 64 experts of
  1408 + 2 shared, top-6, the first layer dense).
`transformers` runs the same shapes with its own random weights; random weights route near uniformly in both.

Rooflines, from the GPU's copy bandwidth and bf16 matmul rate measured first:
- decode at batch B, context C: max(bytes / bandwidth, FLOPs / matmul rate). Bytes: every weight a step needs
  (attention, norms, routers, shared experts, dense layers, LM head) plus the routed experts B tokens touch,
  E x (1 - (1 - k/E)^B) of a layer's E experts under uniform routing, plus the KV cache of B x C tokens. FLOPs:
  2 x active parameters x B plus attention over the context (for MLA, the absorbed form: scores and outputs over
  the latent).
- prefill of L tokens: 2 x active parameters x L plus causal attention, over the matmul rate.
- host time of a prefill forward, eager and replayed from prefill graphs: the host's own work (eagerly: in its
  decoder layers, each started with the GPU idle, so that no launch waits for a full launch queue) against the
  GPU time of its kernels (profiler), with the number of kernels and how long the forward takes to return.
Prefills run as the engine runs them: replayed from prefill graphs (pieces between attentions) where captured.
pdmesh's decode is timed per engine step (scheduling, CUDA-graph replay where captured, sampling); transformers'
as a forward with its KV cache plus argmax.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import _transformers_decode, bench_pdmesh, cuda_time, hardware, write_model_dir
from bench.tbo import BLOCK, QWEN3_30B_A3B, prefill_inputs

DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "vocab_size": 102400,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "topk_method": "greedy",
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": False,
    "routed_scaling_factor": 1.0,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "dtype": "bfloat16",
}
MODELS = {"qwen3_30b_a3b": QWEN3_30B_A3B, "deepseek_v2_lite": DEEPSEEK_V2_LITE}


def hf_model_class(config: dict) -> tuple[Any, Any]:
    import transformers

    if config["model_type"] == "qwen3_moe":
        return transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig
    return transformers.DeepseekV2ForCausalLM, transformers.DeepseekV2Config


def hf_config(config: dict) -> Any:
    _, cls = hf_model_class(config)
    return cls(**{k: v for k, v in config.items() if k not in ("architectures", "model_type", "dtype")})


class Shape:
    """Parameter counts by kind, read off the `transformers` model built on the meta device."""

    def __init__(self, config: dict) -> None:
        model_cls, _ = hf_model_class(config)
        with torch.device("meta"):
            model = model_cls(hf_config(config))
        counts = {"routed": 0, "embed": 0, "other": 0}
        for name, p in model.named_parameters():
            kind = "embed" if "embed_tokens" in name else "routed" if ".experts." in name else "other"
            counts[kind] += p.numel()
        c = config
        self.config = c
        self.experts = c.get("num_experts") or c["n_routed_experts"]
        self.top_k = c["num_experts_per_tok"]
        self.moe_layers = c["num_hidden_layers"] - c.get("first_k_dense_replace", 0)
        self.per_expert = counts["routed"] / (self.experts * self.moe_layers)
        self.dense = counts["other"]  # attention, norms, routers, shared experts, dense layers, LM head
        self.total = sum(counts.values())
        self.active = self.dense + self.moe_layers * self.top_k * self.per_expert
        mla = "kv_lora_rank" in c
        layers, heads = c["num_hidden_layers"], c["num_attention_heads"]
        if mla:
            latent = c["kv_lora_rank"] + c["qk_rope_head_dim"]
            self.kv_bytes_per_token = layers * latent * 2
            # decode, absorbed: scores over latent + rope, outputs over the latent
            self.decode_pair_flops = layers * heads * 2 * (latent + c["kv_lora_rank"])
            qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
            self.prefill_pair_flops = layers * heads * 2 * (qk + c["v_head_dim"])
        else:
            kv = c["num_key_value_heads"] * c["head_dim"]
            self.kv_bytes_per_token = layers * 2 * kv * 2
            self.decode_pair_flops = self.prefill_pair_flops = layers * heads * 4 * c["head_dim"]

    def touched(self, batch: int) -> float:
        return self.experts * (1 - (1 - self.top_k / self.experts) ** batch)

    def decode_roofline(self, hw: dict[str, float], batch: int, context: int) -> tuple[float, float]:
        """(seconds, bytes) of one decode step."""
        nbytes = 2 * (self.dense + self.moe_layers * self.touched(batch) * self.per_expert)
        nbytes += batch * context * self.kv_bytes_per_token
        flops = 2 * self.active * batch + batch * context * self.decode_pair_flops
        return max(nbytes / hw["bandwidth"], flops / hw["matmul_flops"]), nbytes

    def prefill_roofline(self, hw: dict[str, float], tokens: int) -> float:
        flops = 2 * self.active * tokens + tokens * tokens / 2 * self.prefill_pair_flops
        return flops / hw["matmul_flops"]


def host_time(engine: Any, tokens: int, python_profile: bool = False) -> dict[str, dict[str, float]]:
    """One prefill forward of `tokens` (prompts of up to 2048), eagerly and, where captured, replayed from prefill
    graphs: GPU kernel seconds, the host's own seconds, the seconds it takes to return. Eagerly the host's own
    work is timed layer by layer from an idle GPU (once the GPU lags by more launches than the launch queue
    holds, a launch waits for it, so the time the forward takes to return can measure the GPU instead); replayed,
    a forward launches a few hundred pieces and kernels, so it returns when the host is done.
    `python_profile`: print where the eager host's time goes (cProfile, by own time)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    runner = engine.runner
    h = prefill_inputs(tokens, min(tokens, 2048), 0)
    h.token_ids[:] %= engine.model_config.vocab_size
    graphs = runner.prefill_graphs
    if graphs is not None:
        print("prefill graphs' start-up timing, token count: eager / replayed ms (replayed where faster):")
        for size, (eager, replay) in sorted(graphs.timings.items()):
            print(
                f"  {size:>6}: {eager * 1e3:8.2f} / {replay * 1e3:8.2f}{'' if replay > eager else '  replayed'}"
            )
    results: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for mode in ("eager", "graphs") if graphs is not None and graphs.bucket(tokens) else ("eager",):
            runner.prefill_graphs = graphs if mode == "graphs" else None
            for _ in range(2):
                runner.forward_eager(h)
            torch.cuda.synchronize()
            returns, walls, works = [], [], []
            for _ in range(3):
                start = time.perf_counter()
                runner.forward_eager(h)
                returns.append(time.perf_counter() - start)
                torch.cuda.synchronize()
                walls.append(time.perf_counter() - start)
                if mode == "eager":
                    works.append(host_work(runner, h))
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                runner.forward_eager(h)
                torch.cuda.synchronize()
            if python_profile and mode == "eager":
                import cProfile
                import pstats

                with cProfile.Profile() as py:
                    runner.forward_eager(h)
                torch.cuda.synchronize()
                pstats.Stats(py).sort_stats("tottime").print_stats(30)
            kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
            results[mode] = {
                "host_s": min(works or returns),
                "return_s": min(returns),
                "wall_s": min(walls),
                "gpu_s": sum(e.time_range.elapsed_us() for e in kernels) / 1e6,
                "kernels": len(kernels),
            }
    runner.prefill_graphs = graphs
    return results


def host_work(runner: Any, h: Any) -> float:
    """Host seconds of one eager forward's decoder layers, each started with the GPU idle, so no launch waits."""
    spent = 0.0

    def timed(stages: Any) -> Any:
        def run(*args: Any) -> Any:
            nonlocal spent
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = yield from stages(*args)
            spent += time.perf_counter() - start
            return out

        return run

    layers = runner.model.model.layers
    for layer in layers:
        layer.stages = timed(layer.stages)
    try:
        runner.forward_eager(h)
        torch.cuda.synchronize()
    finally:
        for layer in layers:
            del layer.stages
    return spent


def bench_transformers(
    config: dict, batches: list[int], context: int, prefills: list[int], steps: int
) -> dict:
    model_cls, _ = hf_model_class(config)
    with torch.device("meta"):
        model = model_cls(hf_config(config))
    model = model.to_empty(device="cuda").to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    results: dict = {"decode_ms": {}, "prefill_s": {}}
    vocab = config["vocab_size"]
    with torch.no_grad():
        for batch in batches:
            results["decode_ms"][batch] = _transformers_decode(model, batch, context, steps, vocab)
            print(f"transformers decode batch {batch}: {results['decode_ms'][batch]:.2f} ms/step", flush=True)
            torch.cuda.empty_cache()
        for tokens in prefills:
            ids = torch.randint(1000, vocab - 1000, (1, tokens), device="cuda")
            results["prefill_s"][tokens] = cuda_time(lambda i=ids, m=model: m(i, logits_to_keep=1), 2, 1)
            print(f"transformers prefill {tokens}: {results['prefill_s'][tokens] * 1e3:.1f} ms", flush=True)
            torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()
    return results


def report(
    name: str, shape: Shape, hw: dict, ours: dict, theirs: dict | None, args: argparse.Namespace
) -> None:
    print(f"\n{name}: {shape.total / 1e9:.1f}B parameters, {shape.active / 1e9:.2f}B active per token")
    print(f"Decode, context {args.context} tokens (ms per step)")
    header = ["batch", "pdmesh", "(replay)", "roofline", "of roof", "x roof", "transformers", "speed-up"]
    print("".join(f"{h:>13}" for h in header))
    for b in args.batch_list:
        roof = shape.decode_roofline(hw, b, args.context + args.steps // 2)[0] * 1e3
        ours_ms, replay = ours["decode_ms"][b], ours["decode_forward_ms"].get(b, float("nan"))
        hf = theirs["decode_ms"][b] if theirs else float("nan")
        row = [
            b,
            f"{ours_ms:.2f}",
            f"{replay:.2f}",
            f"{roof:.2f}",
            f"{roof / ours_ms:.0%}",
            f"{ours_ms / roof:.2f}x",
            f"{hf:.2f}",
            f"{hf / ours_ms:.1f}x",
        ]
        print("".join(f"{c:>13}" for c in row))
    print("Prefill (s)")
    print(
        f"{'tokens':>6} {'pdmesh':>9} {'roofline':>9} {'% of matmul':>12} {'transformers':>13} {'speed-up':>9}"
    )
    for t in args.prefill_list:
        roof, ours_s = shape.prefill_roofline(hw, t), ours["prefill_s"][t]
        hf = theirs["prefill_s"][t] if theirs else float("nan")
        print(f"{t:>6} {ours_s:>9.3f} {roof:>9.3f} {roof / ours_s:>11.0%} {hf:>13.3f} {hf / ours_s:>8.2f}x")
    for mode, h in ours["host"].items():
        print(
            f"Prefill forward of {args.host_tokens} tokens, {mode}: host {h['host_s'] * 1e3:.1f} ms, GPU kernels "
            f"{h['gpu_s'] * 1e3:.1f} ms (host {h['host_s'] / h['gpu_s']:.0%} of GPU), returns after "
            f"{h['return_s'] * 1e3:.1f} ms, wall {h['wall_s'] * 1e3:.1f} ms, {h['kernels']} kernels",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", default="1,32,128,256")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prefill", default="1024,8192,32768")
    ap.add_argument("--host-tokens", type=int, default=8192, help="tokens of the profiled eager prefill")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--kv-gb", type=float, default=40)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print the top GPU kernels of each decode batch")
    ap.add_argument(
        "--host-profile", action="store_true", help="print the eager prefill's host time by function"
    )
    ap.add_argument("--out", help="write the numbers as JSON here")
    args = ap.parse_args()
    args.batch_list = [int(b) for b in args.batches.split(",")]
    args.prefill_list = [int(p) for p in args.prefill.split(",")]
    assert args.host_tokens % BLOCK == 0
    hw = hardware()
    print(
        f"GPU: {torch.cuda.get_device_name()}; copy bandwidth {hw['bandwidth'] / 1e12:.2f} TB/s, "
        f"bf16 matmul {hw['matmul_flops'] / 1e12:.0f} TFLOP/s",
        flush=True,
    )
    results: dict = {"hardware": hw, "args": {k: v for k, v in vars(args).items()}}
    for name in args.models.split(","):
        config, shape = MODELS[name], Shape(MODELS[name])
        host: dict = {}
        with tempfile.TemporaryDirectory() as tmp:
            ours = bench_pdmesh(
                write_model_dir(Path(tmp), config),
                args.batch_list,
                args.context,
                args.prefill_list,
                args.steps,
                args.profile,
                kv_gb=args.kv_gb,
                extra=lambda engine, host=host: host.update(
                    host_time(engine, args.host_tokens, args.host_profile)
                ),
            )
        ours["host"] = host
        torch.cuda.empty_cache()
        theirs = None
        if not args.skip_transformers:
            theirs = bench_transformers(config, args.batch_list, args.context, args.prefill_list, args.steps)
        report(name, shape, hw, ours, theirs, args)
        rooflines = {
            b: shape.decode_roofline(hw, b, args.context + args.steps // 2)[0] for b in args.batch_list
        }
        results[name] = {
            "pdmesh": ours,
            "transformers": theirs,
            "decode_roofline_s": rooflines,
            "prefill_roofline_s": {t: shape.prefill_roofline(hw, t) for t in args.prefill_list},
            "params": {"total": shape.total, "active": shape.active},
        }
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
