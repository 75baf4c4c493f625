"""Prefill-only and decode-only roles: KV computed by one engine and copied into another's reserved blocks gives
the colocated engine's tokens, and the decode engine computes no prompt token."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.engine import LLM, Engine, EngineConfig, SamplingParams

GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)


def engine(path: Path, role: str) -> Engine:
    return Engine(
        EngineConfig(
            str(path),
            role=role,
            device="cpu",
            dtype="float32",
            block_size=4,
            max_num_batched_tokens=16,
            progress=False,
        )
    )


def run_to_completion(e: Engine, rid: str) -> list[int]:
    tokens = []
    while e.has_unfinished():
        for out in e.step():
            if out.request_id == rid:
                tokens.extend(out.new_token_ids)
    return tokens


def disaggregated(prefill: Engine, decode: Engine, rid: str, prompt: list[int]) -> tuple[list[int], int]:
    reservation = decode.reserve(rid, prompt, GREEDY)
    assert reservation is not None
    prefill.add_request(rid, prompt, GREEDY)
    first = run_to_completion(prefill, rid)
    assert len(first) == 1
    held = prefill.seqs[rid]
    # the KV move: whole blocks from the prefill cache into the decode cache, skipping what decode has cached
    skip = reservation.num_cached_tokens // decode.config.block_size
    src, dst = held.block_ids[skip:], reservation.block_ids[skip:]
    decode.kv_cache.write_blocks(dst, prefill.kv_cache.blocks(src))
    prefill.release(rid)
    before = decode.runner.num_computed_tokens
    outs = decode.admit_prefilled(rid, first[0])
    tokens = [t for o in outs for t in o.new_token_ids] + run_to_completion(decode, rid)
    return tokens, decode.runner.num_computed_tokens - before


@pytest.fixture(scope="module")
def prompts(llama_checkpoint: Path) -> list[list[int]]:
    llm = LLM(str(llama_checkpoint), device="cpu", dtype="float32", progress=False)
    base = llm.tokenizer.encode(
        "The router decides where each request goes, keeps the workers busy, and streams"
    )
    return [base, base[:7], base + base[3:9]]


def test_prefill_then_decode_matches_colocated(llama_checkpoint: Path, prompts: list[list[int]]) -> None:
    colocated = engine(llama_checkpoint, "colocated")
    prefill, decode = engine(llama_checkpoint, "prefill"), engine(llama_checkpoint, "decode")
    for i, prompt in enumerate(prompts):
        colocated.add_request(f"c{i}", prompt, GREEDY)
        expected = run_to_completion(colocated, f"c{i}")
        tokens, computed = disaggregated(prefill, decode, f"r{i}", prompt)
        assert tokens == expected
        # decode ran only on generated tokens (each but the last): no prompt token was recomputed
        assert computed == GREEDY.max_tokens - 1
    for e in (prefill, decode, colocated):
        assert e.allocator.num_used == 0 and e.seqs == {}


def test_decode_reserve_reuses_its_prefix_cache(llama_checkpoint: Path, prompts: list[list[int]]) -> None:
    prefill, decode = engine(llama_checkpoint, "prefill"), engine(llama_checkpoint, "decode")
    _first, _ = disaggregated(prefill, decode, "a", prompts[0])
    reservation = decode.reserve("probe", prompts[2], GREEDY)
    assert reservation is not None and reservation.num_cached_tokens > 0
    decode.release("probe")
    again, _ = disaggregated(prefill, decode, "b", prompts[2])
    colocated = engine(llama_checkpoint, "colocated")
    colocated.add_request("c", prompts[2], GREEDY)
    assert again == run_to_completion(colocated, "c")
    assert decode.allocator.num_used == 0


def test_roles_refuse_the_wrong_calls(llama_checkpoint: Path, prompts: list[list[int]]) -> None:
    decode = engine(llama_checkpoint, "decode")
    with pytest.raises(RuntimeError, match="decode worker takes prefilled sequences"):
        decode.add_request("x", prompts[0], GREEDY)
    small = Engine(
        EngineConfig(
            str(llama_checkpoint),
            role="decode",
            device="cpu",
            dtype="float32",
            block_size=4,
            num_blocks=8,
            progress=False,
        )
    )
    assert small.reserve("a", prompts[0][:20], GREEDY) is not None
    assert small.reserve("b", prompts[0][:20], GREEDY) is None  # full: the caller retries or goes elsewhere
    assert "b" not in small.seqs
    small.release("a")
    assert small.allocator.num_used == 0
