"""Chunked prefill and prefix-cache hits give the same tokens as one unchunked, uncached pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.engine import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def prompts(llm: LLM) -> list[list[int]]:
    base = llm.tokenizer.encode(
        "A serving system turns a model into a service. Requests arrive over the network; each carries a prompt "
        "and asks for a continuation. The prompt is processed all at once, which is called prefill."
    )
    return [base, base[:37], base[5:], base[:9] + base[20:], base[:60]]


@pytest.fixture(scope="module")
def reference(llama_checkpoint: Path) -> list[list[int]]:
    llm = LLM(
        str(llama_checkpoint),
        device="cpu",
        dtype="float32",
        block_size=16,
        enable_prefix_caching=False,
        max_num_batched_tokens=4096,
        progress=False,
    )
    ps = prompts(llm)
    assert max(len(p) for p in ps) < 4096
    # one request at a time: each prompt is one unchunked, uncached pass
    return [llm.generate([p], GREEDY)[0].token_ids for p in ps]


@pytest.mark.parametrize(("budget", "block_size"), [(7, 4), (16, 16), (33, 8), (50, 16)])
def test_chunked_prefill_same_tokens(
    llama_checkpoint: Path, reference: list[list[int]], budget: int, block_size: int
):
    llm = LLM(
        str(llama_checkpoint),
        device="cpu",
        dtype="float32",
        block_size=block_size,
        max_num_batched_tokens=budget,
        enable_prefix_caching=False,
        progress=False,
    )
    ps = prompts(llm)
    assert any(len(p) > budget for p in ps), "some prompt must need several chunks"
    outs = llm.generate(ps, GREEDY)
    assert [o.token_ids for o in outs] == reference


def test_prefix_cache_hits_skip_compute_and_keep_tokens(
    llama_checkpoint: Path, reference: list[list[int]]
) -> None:
    llm = LLM(
        str(llama_checkpoint),
        device="cpu",
        dtype="float32",
        block_size=8,
        max_num_batched_tokens=13,
        progress=False,
    )
    ps = prompts(llm)
    first = llm.generate([ps[0]], GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert first.token_ids == reference[0]

    runner = llm.engine.runner
    for i in (0, 1, 4):  # the same prompt again, and prompts sharing its prefix
        before = runner.num_computed_tokens
        out = llm.generate([ps[i]], GREEDY)[0]
        computed = runner.num_computed_tokens - before
        assert out.token_ids == reference[i]
        # whole blocks of the shared prefix are reused; the last token is always computed
        expected_cached = min(len(ps[i]) - 1, len(ps[0])) // 8 * 8
        assert out.num_cached_tokens == expected_cached > 0
        # the model ran on the uncached prompt tokens and on each generated token but the last
        assert computed == len(ps[i]) - expected_cached + GREEDY.max_tokens - 1


def test_prefix_cache_with_concurrent_requests(llama_checkpoint: Path, reference: list[list[int]]) -> None:
    llm = LLM(
        str(llama_checkpoint),
        device="cpu",
        dtype="float32",
        block_size=4,
        max_num_batched_tokens=16,
        progress=False,
    )
    ps = prompts(llm)
    outs = llm.generate(ps + ps, GREEDY)
    assert [o.token_ids for o in outs] == reference + reference
    assert sum(o.num_cached_tokens for o in outs) > 0
    assert llm.engine.allocator.num_used == 0
