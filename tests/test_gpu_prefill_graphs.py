"""Prefill steps replayed from CUDA graphs in pieces (services/engine/prefill_graphs.py) against `transformers` and
against the same engine run eagerly. GPU only: graphs cannot be captured on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="prefill graphs are captured on GPUs only")
FP32_GPU = dict(device="cuda", dtype="float32", block_size=4, progress=False)  # engine options of every test


def _model(name: str, tmp_path: Path, llama_checkpoint: Path):  # type: ignore[no-untyped-def]
    """(checkpoint dir, the transformers model) for a dense, an MoE and a latent-attention model."""
    from transformers import AutoModelForCausalLM

    from tests.test_moe_models import build

    if name == "llama":
        return llama_checkpoint, AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32)
    return tmp_path, build(name, tmp_path)


@pytest.mark.parametrize("name", ["llama", "qwen3_moe", "deepseek_v2"])
def test_prefill_graphs_match_transformers_and_eager_steps(
    name: str, tmp_path: Path, llama_checkpoint: Path
) -> None:
    """Prompts of several lengths in one batch (steps of 4 to 188 tokens, padded to buckets of 64, 128 and the
    188-token budget), a prompt chunked over several steps, decodes mixed into prefill steps, then prompts whose
    prefixes are cached (attention over cached context between the pieces): greedy tokens equal to
    `transformers`, and to the engine without prefill graphs."""
    from services.engine import LLM, SamplingParams
    from tests.test_models_vs_transformers import hf_generate

    path, hf = _model(name, tmp_path, llama_checkpoint)
    vocab = hf.config.vocab_size
    first = [[0, *range(5, 5 + n)] for n in (3, 20, 41, 150)]
    again = [
        [*p, *((7 * i + 11) % vocab for i in range(k))] for p, k in zip(first[1:], (5, 30, 70), strict=True)
    ]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    common = dict(FP32_GPU, max_model_len=512, max_num_batched_tokens=188)
    outputs = {}
    for graphs in (True, False):
        llm = LLM(str(path), attention_backend="triton", prefill_graphs=graphs, **common)
        runner = llm.engine.runner
        assert (runner.prefill_graphs is not None) == graphs
        if graphs:
            assert runner.prefill_graphs is not None and runner.prefill_graphs.sizes == [64, 128, 188]
        outs = llm.generate(first, params) + llm.generate(again, params)
        assert (runner.num_prefill_graph_steps > 0) == graphs
        assert sum(o.num_cached_tokens for o in outs[len(first) :]) > 0  # the second round hit the cache
        outputs[graphs] = [o.token_ids for o in outs]
    want = [hf_generate(hf.eval(), prompt, 8)[0] for prompt in first + again]
    assert outputs[True] == want
    assert outputs[False] == want


@pytest.mark.parametrize("name", ["llama", "deepseek_v2"])
def test_decode_batches_beyond_the_decode_graphs_replay_in_pieces(
    name: str, tmp_path: Path, llama_checkpoint: Path
) -> None:
    """Decode batches larger than the largest decode graph run through the prefill graphs, padded: the latent
    decode must read the batch's sequences only (greedy tokens equal to `transformers`)."""
    from services.engine import LLM, SamplingParams
    from tests.test_models_vs_transformers import hf_generate

    path, hf = _model(name, tmp_path, llama_checkpoint)
    prompts = [[0, *range(5, 5 + n)] for n in (3, 9, 17, 30, 41)]
    llm = LLM(str(path), max_model_len=256, cuda_graph_max_batch=2, **FP32_GPU)
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert llm.engine.runner.num_prefill_graph_steps > 0
    assert [o.token_ids for o in outs] == [hf_generate(hf.eval(), p, 6)[0] for p in prompts]
