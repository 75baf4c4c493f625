"""Block allocator invariants, under unit cases and under a randomized load with aborts and preemptions."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from services.engine import LLM, RequestError, SamplingParams
from services.engine.block_manager import BlockAllocator
from services.engine.sequence import Sequence


def seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence.new(rid, tokens, SamplingParams())


def test_prefix_blocks_are_shared_and_refcounted() -> None:
    a = BlockAllocator(num_blocks=8, block_size=4)
    s1 = seq(list(range(10)), "a")
    assert a.allocate_prompt(s1) and len(s1.block_ids) == 3 and s1.num_computed_tokens == 0
    s1.num_computed_tokens = 10
    a.register_full_blocks(s1)
    assert s1.num_hashed_blocks == 2  # the partial third block is not cached

    s2 = seq([*list(range(9)), 99], "b")  # shares two full blocks
    assert a.allocate_prompt(s2)
    assert s2.block_ids[:2] == s1.block_ids[:2] and s2.block_ids[2] != s1.block_ids[2]
    assert s2.num_computed_tokens == 8
    assert [a.ref_counts[b] for b in s1.block_ids] == [2, 2, 1]

    a.free_seq(s1)
    a.free_seq(s2)
    a.check()
    assert a.num_free == 8 and all(r == 0 for r in a.ref_counts)
    # freed blocks stay cached: the same prompt hits them again
    s3 = seq(list(range(10)), "c")
    assert a.allocate_prompt(s3) and s3.num_computed_tokens == 8


def test_fully_cached_prompt_still_computes_its_last_token() -> None:
    a = BlockAllocator(num_blocks=4, block_size=4)
    s1 = seq(list(range(8)), "a")
    assert a.allocate_prompt(s1)
    s1.num_computed_tokens = 8
    a.register_full_blocks(s1)
    a.free_seq(s1)
    s2 = seq(list(range(8)), "b")
    assert a.allocate_prompt(s2)
    assert s2.num_computed_tokens == 4  # the last block is recomputed so the last token yields logits


def test_eviction_reuses_least_recently_freed_and_forgets_hash() -> None:
    a = BlockAllocator(num_blocks=3, block_size=2)
    s1 = seq([1, 2, 3, 4], "a")
    assert a.allocate_prompt(s1)
    s1.num_computed_tokens = 4
    a.register_full_blocks(s1)
    a.free_seq(s1)
    assert len(a.cached) == 2
    s2 = seq([7, 8, 9, 10, 11, 12], "b")  # needs all three blocks: evicts both cached ones
    assert a.allocate_prompt(s2)
    assert a.cached == {} and a.num_free == 0
    a.check()


def test_out_of_blocks_changes_nothing() -> None:
    a = BlockAllocator(num_blocks=2, block_size=4)
    s1 = seq(list(range(12)), "a")
    assert not a.allocate_prompt(s1)
    assert s1.block_ids == [] and a.num_free == 2
    s2 = seq([1], "b")
    assert a.allocate_prompt(s2)
    assert not a.grow(s2, 100)
    assert len(s2.block_ids) == 1 and a.num_free == 1


def test_randomized_requests_with_aborts_and_preemptions(llama_checkpoint: Path) -> None:
    """>= 200 requests against a cache too small for them all: preemptions happen, aborts land at random
    moments, nothing crashes, surviving requests are unaffected, and every block ends free with ref count 0."""
    rng = random.Random(1234)
    vocab = 500
    requests = []
    shared = [rng.randrange(vocab) for _ in range(24)]
    for i in range(220):
        n = rng.randint(1, 40)
        body = [rng.randrange(vocab) for _ in range(n)]
        prompt = (shared[: rng.randint(0, 24)] + body) if rng.random() < 0.5 else body
        requests.append(
            (f"r{i}", prompt, SamplingParams(max_tokens=rng.randint(1, 24), temperature=0, ignore_eos=True))
        )

    reference_llm = LLM(str(llama_checkpoint), device="cpu", dtype="float32", block_size=4, progress=False)
    reference = {
        r[0]: o.token_ids
        for r, o in zip(
            requests, reference_llm.generate([r[1] for r in requests], [r[2] for r in requests]), strict=True
        )
    }

    llm = LLM(
        str(llama_checkpoint),
        device="cpu",
        dtype="float32",
        block_size=4,
        num_blocks=40,
        max_num_batched_tokens=32,
        max_num_seqs=12,
        progress=False,
    )
    engine, allocator = llm.engine, llm.engine.allocator
    outputs: dict[str, list[int]] = {}
    finished: set[str] = set()
    aborted: set[str] = set()
    pending = list(requests)
    steps = 0
    while pending or engine.has_unfinished():
        for _ in range(rng.randint(0, 4)):  # arrivals
            if pending:
                rid, prompt, params = pending.pop(0)
                engine.add_request(rid, prompt, params)
                outputs[rid] = []
        if rng.random() < 0.15:  # an abort at a random moment
            live = [r for r in outputs if r not in finished and r not in aborted]
            if live:
                victim = rng.choice(live)
                assert engine.abort(victim)
                aborted.add(victim)
        for out in engine.step():
            outputs[out.request_id].extend(out.new_token_ids)
            if out.finished:
                finished.add(out.request_id)
        allocator.check()
        steps += 1
        assert steps < 20000, "the engine stopped making progress"

    stats = engine.scheduler.stats
    assert stats.num_preemptions > 0, "the cache was meant to be too small: preemption never happened"
    assert len(aborted) > 5
    assert finished | aborted == set(outputs) and len(outputs) == 220
    for rid in finished - aborted:
        assert outputs[rid] == reference[rid], f"{rid} changed under preemption"
    assert allocator.num_free == allocator.num_blocks
    assert all(r == 0 for r in allocator.ref_counts)
    assert engine.seqs == {} and not engine.scheduler.running and not engine.scheduler.waiting


def test_prompt_larger_than_cache_is_rejected_clearly(llama_checkpoint: Path) -> None:
    llm = LLM(
        str(llama_checkpoint), device="cpu", dtype="float32", block_size=4, num_blocks=8, progress=False
    )
    assert llm.engine.runtime.max_model_len == 32
    with pytest.raises(RequestError, match="at most 32 tokens"):
        llm.engine.add_request("big", list(range(40)), SamplingParams())
    # a request that fits but outgrows the cache stops at the length limit instead of stalling
    out = llm.generate([list(range(20))], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 12
    assert llm.engine.allocator.num_used == 0


def test_kv_events_replay_to_the_prefix_cache_and_feed_an_exact_index() -> None:
    """Replaying the allocator's events (from any point, or a snapshot) gives exactly its cached hashes; the
    router's index built from them finds the prefix the allocator would reuse."""
    from services.common.block_hash import prefix_hashes
    from services.router.kv_index import KvIndex

    rng = random.Random(4)
    a = BlockAllocator(num_blocks=24, block_size=4)
    replayed: set[int] = set()
    seen = 0
    prompts = [[rng.randrange(4) for _ in range(rng.randrange(5, 30))] for _ in range(60)]
    for i, tokens in enumerate(prompts):
        s = seq(tokens, f"r{i}")
        if not a.allocate_prompt(s):
            continue
        s.num_computed_tokens = len(tokens)
        a.register_full_blocks(s)
        a.free_seq(s)
        events = a.events.since(seen)
        assert events is not None
        for n, stored, h in events:
            assert n == seen + 1
            seen = n
            (replayed.add if stored else replayed.discard)(h)
        assert replayed == set(a.cached)
    assert a.events.since(seen + 5) is None  # a number it never gave out: start over from a snapshot

    index = KvIndex()
    index.reset("w1", "i1", seen, a.cached)
    index.reset("w2", "i2", 0, [])
    for tokens in prompts[-10:]:
        hashes = prefix_hashes(tokens, 4, len(tokens) - 1)
        expect = len(a.match_prefix(tokens, len(tokens) - 1))
        assert index.matched_blocks(hashes).get("w1", 0) == expect
        assert "w2" not in index.matched_blocks(hashes)
    index.drop("w1")
    assert index.blocks("w1") == 0 and index.matched_blocks(prefix_hashes(prompts[-1], 4)) == {}
