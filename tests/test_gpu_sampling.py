"""The engine's sampling features on a CUDA GPU (CUDA graphs, steps launched ahead of the last one's tokens):
logit_bias and structured outputs, checked as tests/test_sampling.py checks them on the CPU. Runs wherever a CUDA
GPU and xgrammar are present (CI has no GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.engine import LLM
from tests.test_sampling import (  # noqa: F401  (collected here against this module's GPU engine)
    test_an_unusable_schema_is_the_requests_error,
    test_json_schema_outputs_validate_for_20_seeds,
    test_logit_bias_forces_and_bans_when_sampling,
    test_logit_bias_matches_transformers_sequence_bias,
    test_logit_bias_outside_the_vocabulary_is_refused,
    test_seeded_generation_reproduces,
    test_stop_token_ids_max_tokens_and_eos,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def llm(llama_checkpoint: Path) -> LLM:
    return LLM(str(llama_checkpoint), device="cuda", dtype="float32", block_size=16, progress=False)


def test_logit_bias_on_the_gpu_needs_no_host_sync() -> None:
    """The batch's biases are copied to the GPU without waiting for it (non_blocking) and added
    with one index_put: no synchronisation while sampling (CUDA's sync debug mode raises on any), and the tokens
    are the CPU sampler's."""
    from services.common.sampling_params import SamplingParams
    from services.engine.sampler import Sampler, SamplingBatch
    from services.engine.sequence import Sequence

    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(0)) * 3
    params = [
        SamplingParams(temperature=0, logit_bias={7: 100.0}),
        SamplingParams(temperature=0, logit_bias={int(logits[1].argmax()): -100.0, 3: 2.5}),
        SamplingParams(temperature=0),
    ]
    seqs = [Sequence.new(f"s{i}", [1, 2, 3], p) for i, p in enumerate(params)]
    want = Sampler()(logits, SamplingBatch.from_seqs(seqs, torch.device("cpu"))).token_ids
    gpu_logits = logits.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = Sampler()(gpu_logits, SamplingBatch.from_seqs(seqs, torch.device("cuda"))).token_ids
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.tolist() == want.tolist() and want[0] == 7
