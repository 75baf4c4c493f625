"""Time to first token for a long prompt, uncached (baseline) vs served from the prefix cache, in one run.

python bench/prefix_cache.py [--prompt-len 2048] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from services.engine import LLM, SamplingParams
from services.engine.tiny_model import make_tiny_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(
            Path(tmp) / "m",
            "llama",
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=32,
        )
        llm = LLM(str(model), device=args.device, dtype="float32", max_num_batched_tokens=512, progress=False)
        rng = random.Random(0)
        one = SamplingParams(max_tokens=1, temperature=0)
        cold, warm = [], []
        for _ in range(args.repeats):
            prompt = [rng.randrange(4, 500) for _ in range(args.prompt_len)]
            for times in (cold, warm):  # the first pass fills the cache, the second hits it
                start = time.perf_counter()
                out = llm.generate([prompt], one, progress=False)[0]
                times.append(time.perf_counter() - start)
            assert out.num_cached_tokens >= args.prompt_len - llm.engine.config.block_size
        c, w = statistics.median(cold), statistics.median(warm)
        print(
            f"prompt {args.prompt_len} tokens, {args.repeats} prompts, median time to first token on {args.device}"
        )
        print(f"  uncached (baseline): {c * 1e3:8.1f} ms")
        print(f"  prefix-cache hit   : {w * 1e3:8.1f} ms   ({out.num_cached_tokens} tokens from cache)")
        print(f"  speed-up           : {c / w:8.1f}x")


if __name__ == "__main__":
    main()
