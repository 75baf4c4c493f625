"""Seeded sampling and logprobs through prefill/decode disaggregation equal the colocated engine's.

The prefill worker samples the first token with the request's seeded generator; the decode worker continues with
its own generator of the same seed, advanced past that first draw (`skip_sampled_step`). Checked on the sampler
(CPU and CUDA generators), on engines in this process, and end to end with real processes: one disaggregated and
one colocated cluster serve the same checkpoint, and an in-process engine is the reference.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from services.common.logprob import TokenLogprob
from services.common.tokenizer import Tokenizer
from services.engine import LLM, Engine, EngineConfig, SamplingParams
from services.engine.sampler import Sampler, SamplingBatch, skip_sampled_step
from services.engine.sequence import Sequence
from tests.cluster import Cluster, random_prompts, start_cluster

MAX_TOKENS = 12
TOLERANCE = 1e-5
# (seed, sampling options): plain temperature, then top-k and top-p variants
SEEDED = [
    (1, {"temperature": 0.8}),
    (2, {"temperature": 0.9}),
    (3, {"temperature": 1.0}),
    (4, {"temperature": 1.0}),
    (5, {"temperature": 0.9, "top_k": 20}),
    (6, {"temperature": 1.0, "top_p": 0.9}),
]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def seeded_params(seed: int, options: dict[str, Any], **extra: Any) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, seed=seed, ignore_eos=True, **options, **extra)


# ---- the sampler ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("width", [64, 50_000])  # one vocabulary fits one CUDA block, the other spans many
@pytest.mark.parametrize("options", [{}, {"top_k": 5}, {"top_p": 0.8}])
def test_skip_sampled_step_consumes_exactly_one_sampled_step(device: str, width: int, options: dict) -> None:
    dev = torch.device(device)
    logits = torch.randn(3, width, generator=torch.Generator().manual_seed(0)).to(dev) * 3
    sampled = torch.Generator(dev).manual_seed(11)
    skipped = torch.Generator(dev).manual_seed(11)
    seqs = []
    for i, params in enumerate(
        [
            SamplingParams(temperature=0.7),
            SamplingParams(temperature=1.0, seed=11, **options),
            SamplingParams(),
        ]
    ):
        seqs.append(Sequence.new(f"s{i}", [1, 2, 3], params))
    seqs[1].generator = sampled
    sampler = Sampler(torch.Generator(dev).manual_seed(0))
    sampler(logits, SamplingBatch.from_seqs(seqs, dev))  # one sampled step, the seeded row in the middle

    fresh_state = torch.Generator(dev).manual_seed(11).get_state()
    skip_sampled_step(skipped, width)
    assert not torch.equal(skipped.get_state(), fresh_state)
    assert torch.equal(skipped.get_state(), sampled.get_state())

    # and so the next steps draw the same tokens
    def next_tokens(generator: torch.Generator) -> list[int]:
        seqs[1].generator = generator
        return [sampler(logits, SamplingBatch.from_seqs(seqs, dev)).token_ids[1].item() for _ in range(4)]

    assert next_tokens(skipped) == next_tokens(sampled)


# ---- engines in this process: the KV copied between them as the transfer would --------------------------------
def engine(path: Path, role: str, device: str = "cpu") -> Engine:
    return Engine(EngineConfig(str(path), role=role, device=device, dtype="float32", progress=False))


def run_to_completion(e: Engine, rid: str) -> tuple[list[int], list[TokenLogprob]]:
    tokens, logprobs = [], []
    while e.has_unfinished():
        for out in e.step():
            if out.request_id == rid:
                tokens += out.new_token_ids
                logprobs += out.new_logprobs
    return tokens, logprobs


def disaggregated(
    prefill: Engine, decode: Engine, rid: str, prompt: list[int], params: SamplingParams
) -> tuple[list[int], list[TokenLogprob]]:
    reservation = decode.reserve(rid, prompt, params)
    assert reservation is not None
    prefill.add_request(rid, prompt, params)
    first, first_logprobs = run_to_completion(prefill, rid)
    assert len(first) == 1
    # the KV move: whole blocks from the prefill cache into the decode cache, skipping what decode has cached
    skip = reservation.num_cached_tokens // decode.config.block_size
    src, dst = prefill.seqs[rid].block_ids[skip:], reservation.block_ids[skip:]
    decode.kv_cache.write_blocks(dst, prefill.kv_cache.blocks(src))
    prefill.release(rid)
    outs = decode.admit_prefilled(rid, first[0])
    assert [t for o in outs for t in o.new_token_ids] == first
    tokens, logprobs = run_to_completion(decode, rid)
    return first + tokens, first_logprobs + logprobs  # the decode service forwards the first token's logprob


@pytest.mark.parametrize("device", DEVICES)  # on CUDA: Philox generators, graphs and overlapped decode steps
def test_seeded_prefill_then_decode_equals_colocated_in_process(llama_checkpoint: Path, device: str) -> None:
    colocated = engine(llama_checkpoint, "colocated", device)
    prefill, decode = engine(llama_checkpoint, "prefill", device), engine(llama_checkpoint, "decode", device)
    prompt = random_prompts(5, [21])[0]
    for seed, options in SEEDED:
        params = seeded_params(seed, options, logprobs=2)
        colocated.add_request(f"c{seed}", prompt, params)
        expected, expected_logprobs = run_to_completion(colocated, f"c{seed}")
        tokens, logprobs = disaggregated(prefill, decode, f"d{seed}", prompt, params)
        assert tokens == expected, (seed, options)
        assert_logprobs_close(logprobs, expected_logprobs)
    for e in (prefill, decode, colocated):
        assert e.allocator.num_used == 0 and e.seqs == {}


def assert_logprobs_close(got: list[TokenLogprob], expected: list[TokenLogprob]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.token_id == e.token_id
        assert g.logprob == pytest.approx(e.logprob, abs=TOLERANCE)
        assert [t for t, _ in g.top] == [t for t, _ in e.top]
        assert [v for _, v in g.top] == pytest.approx([v for _, v in e.top], abs=TOLERANCE)


# ---- real processes: HTTP -> router -> prefill -> Mooncake -> decode, against a colocated cluster ---------------
@pytest.fixture(scope="module")
def pd(llama_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = start_cluster(llama_checkpoint, tmp_path_factory.mktemp("pd-sampling-logs"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def colocated(llama_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = start_cluster(llama_checkpoint, tmp_path_factory.mktemp("co-sampling-logs"), mode="colocated")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def reference(llama_checkpoint: Path) -> LLM:
    """The engine in this process, configured as the clusters' workers are."""
    return LLM(str(llama_checkpoint), device="cpu", dtype="float32", num_blocks=2048, progress=False)


def complete(url: str, model: str, prompt: list[int], params: SamplingParams, stream: bool = False) -> dict:
    """The token ids and the completions `logprobs` object (or None) of one request, streamed or not."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_k": params.top_k,
        "top_p": params.top_p,
        "seed": params.seed,
        "logprobs": params.logprobs,
        "ignore_eos": True,
        "return_token_ids": True,
        "stream": stream,
    }
    if not stream:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return {"token_ids": choice["token_ids"], "logprobs": choice["logprobs"]}
    merged: dict[str, Any] = {"token_ids": [], "logprobs": None}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            merged["token_ids"] += choice["token_ids"]
            if choice["logprobs"] is not None:
                lp = merged["logprobs"] = merged["logprobs"] or {k: [] for k in choice["logprobs"]}
                for key, values in choice["logprobs"].items():
                    lp[key] += values
    return merged


def engine_logprobs(tok: Tokenizer, logprobs: list[TokenLogprob]) -> dict[str, list]:
    """The engine's logprobs in the completions format (top logprobs keyed by token text, as the router does)."""

    def text(token_id: int) -> str:
        return tok.decode([token_id], skip_special_tokens=False)

    return {
        "tokens": [text(lp.token_id) for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{text(t): v for t, v in lp.top} for lp in logprobs],
    }


def assert_same_logprobs(got: dict, expected: dict) -> None:
    assert got["tokens"] == expected["tokens"]
    assert got["token_logprobs"] == pytest.approx(expected["token_logprobs"], abs=TOLERANCE)
    assert len(got["top_logprobs"]) == len(expected["top_logprobs"])
    for g, e in zip(got["top_logprobs"], expected["top_logprobs"], strict=True):
        assert list(g) == list(e)  # the same tokens, best first
        assert list(g.values()) == pytest.approx(list(e.values()), abs=TOLERANCE)


def test_seeded_sampling_through_pd_equals_colocated(
    pd: Cluster, colocated: Cluster, reference: LLM, llama_checkpoint: Path
) -> None:
    model = llama_checkpoint.name
    prompts = random_prompts(11, [9, 40])
    greedy = {
        tuple(p): reference.generate(
            p, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        )[0].token_ids
        for p in prompts
    }
    completions = set()
    for prompt in prompts:
        for seed, options in SEEDED:
            params = seeded_params(seed, options)
            got = complete(pd.url, model, prompt, params)["token_ids"]
            assert len(got) == MAX_TOKENS
            assert got == complete(colocated.url, model, prompt, params)["token_ids"], (seed, options)
            assert got == reference.generate(prompt, params)[0].token_ids, (seed, options)
            completions.add((tuple(prompt), tuple(got)))
    # the seeds really steer the draws (identical completions would compare nothing)
    assert len(completions) == len(prompts) * len(SEEDED)
    assert any(list(tokens) != greedy[prompt] for prompt, tokens in completions)


@pytest.mark.parametrize(
    "options",
    [{"temperature": 0}, {"temperature": 0.9, "seed": 3}, {"temperature": 1.0, "top_p": 0.9, "seed": 4}],
    ids=["greedy", "seeded", "seeded-top-p"],
)
@pytest.mark.parametrize("max_tokens", [1, 8])  # 1: the prefill worker's token ends the request, no decode
def test_logprobs_through_pd_equal_colocated_and_the_engine(
    pd: Cluster, colocated: Cluster, reference: LLM, llama_checkpoint: Path, options: dict, max_tokens: int
) -> None:
    model = llama_checkpoint.name
    tok = Tokenizer(llama_checkpoint)
    prompt = random_prompts(12, [27])[0]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, logprobs=5, **options)
    expected = reference.generate(prompt, params)[0]
    assert len(expected.logprobs) == max_tokens
    want = engine_logprobs(tok, expected.logprobs)
    for url, stream in ((pd.url, False), (pd.url, True), (colocated.url, False)):
        got = complete(url, model, prompt, params, stream)
        assert got["token_ids"] == expected.token_ids, (url, stream)
        assert got["logprobs"] is not None and len(got["logprobs"]["top_logprobs"][0]) >= 1
        assert_same_logprobs(got["logprobs"], want)
