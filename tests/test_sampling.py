"""Sampling: the logits transforms against references on fixed logits, seeds, stops and logprobs end to end."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from services.engine import LLM, RequestError, SamplingParams
from services.engine.sampler import (
    Sampler,
    SamplingBatch,
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_p,
)
from services.engine.sequence import Sequence

VOCAB = 64


def fixed_logits(rows: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def batch(params: list[SamplingParams], outputs: list[list[int]] | None = None) -> SamplingBatch:
    seqs = []
    for i, p in enumerate(params):
        s = Sequence.new(f"s{i}", [1, 2, 3], p)
        s.token_ids.extend((outputs or [[]] * len(params))[i])
        if p.seed is not None:
            s.generator = torch.Generator().manual_seed(p.seed)
        seqs.append(s)
    return SamplingBatch.from_seqs(seqs, torch.device("cpu"))


def finite(x: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(x)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_top_k_matches_transformers(k: int) -> None:
    logits = fixed_logits()
    ours = apply_top_k(logits, torch.full((4,), k))
    ref = TopKLogitsWarper(top_k=k)(None, logits.clone())
    assert torch.equal(finite(ours), finite(ref))
    assert finite(ours).sum(-1).tolist() == [k] * 4


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_matches_transformers(p: float) -> None:
    logits = fixed_logits(seed=1)
    ours = apply_top_p(logits, torch.full((4,), p))
    ref = TopPLogitsWarper(top_p=p)(None, logits.clone())
    assert torch.equal(finite(ours), finite(ref))


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5])
def test_min_p_matches_transformers(p: float) -> None:
    logits = fixed_logits(seed=2)
    ours = apply_min_p(logits, torch.full((4,), p))
    ref = MinPLogitsWarper(min_p=p)(None, logits.clone())
    assert torch.equal(finite(ours), finite(ref))


def test_per_row_parameters_apply_to_their_row_only() -> None:
    logits = fixed_logits(seed=3)
    out = apply_top_k(logits, torch.tensor([0, 3, 0, 10]))
    assert finite(out).sum(-1).tolist() == [VOCAB, 3, VOCAB, 10]
    out = apply_top_p(logits, torch.tensor([1.0, 0.5, 1.0, 0.2]))
    for row, p in [(1, 0.5), (3, 0.2)]:
        assert torch.equal(
            finite(out[row]), finite(TopPLogitsWarper(top_p=p)(None, logits[row : row + 1].clone())[0])
        )
    assert finite(out[0]).all() and finite(out[2]).all()


def test_penalties_match_the_openai_formula() -> None:
    logits = fixed_logits(rows=3, seed=4)
    outputs = [[5, 5, 5, 9], [], [1, 2, 2]]
    params = [
        SamplingParams(presence_penalty=0.7, frequency_penalty=0.3),
        SamplingParams(presence_penalty=1.0),
        SamplingParams(frequency_penalty=-0.5),
    ]
    ours = apply_penalties(logits.clone(), batch(params, outputs))
    ref = logits.numpy().copy()
    for row, (p, out) in enumerate(zip(params, outputs, strict=True)):
        counts = np.bincount(np.array(out, dtype=np.int64), minlength=VOCAB)
        ref[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    assert np.allclose(ours.numpy(), ref, atol=1e-6)


def test_temperature_sampling_follows_the_distribution() -> None:
    """The exponential-race draw samples from softmax(logits / T): frequencies within 5 standard errors."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    temperature = 0.7
    sampler = Sampler(torch.Generator().manual_seed(0))
    rows = batch([SamplingParams(temperature=temperature)] * 1000)
    draws = 20000
    tokens = torch.cat([sampler(logits.repeat(1000, 1), rows).token_ids for _ in range(draws // 1000)])
    counts = torch.bincount(tokens, minlength=4).float()
    probs = (logits[0] / temperature).softmax(-1)
    stderr = (probs * (1 - probs) / draws).sqrt()
    assert ((counts / draws - probs).abs() < 5 * stderr).all(), (counts / draws, probs)


def test_seeded_rows_reproduce_whatever_the_batch() -> None:
    logits = fixed_logits(rows=1, seed=5)
    p = SamplingParams(temperature=1.0, seed=42)
    alone = [Sampler()(logits, batch([p])).token_ids.item() for _ in range(3)]
    assert len(set(alone)) == 1
    mixed = Sampler()(torch.cat([fixed_logits(rows=3, seed=6), logits]), batch([SamplingParams()] * 3 + [p]))
    assert mixed.token_ids[-1].item() == alone[0]


@pytest.fixture(scope="module")
def llm(llama_checkpoint: Path) -> LLM:
    return LLM(str(llama_checkpoint), device="cpu", dtype="float32", block_size=4, progress=False)


def test_seeded_generation_reproduces(llm: LLM) -> None:
    prompt = llm.tokenizer.encode("Once upon a time")
    p = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    a = llm.generate([prompt], p)[0].token_ids
    # the same seed in a different batch, beside unseeded requests
    others = [llm.tokenizer.encode(t) for t in ("Hello", "The quick brown fox")]
    b = llm.generate([*others, prompt], [SamplingParams(max_tokens=30, temperature=1.0)] * 2 + [p])[
        -1
    ].token_ids
    c = llm.generate(
        [prompt], SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=8, ignore_eos=True)
    )[0]
    assert a == b
    assert c.token_ids != a


def test_logprobs_are_the_raw_distribution(llm: LLM) -> None:
    prompt = llm.tokenizer.encode("Hello world!")
    out = llm.generate(
        [prompt], SamplingParams(max_tokens=6, temperature=0.8, seed=1, logprobs=3, ignore_eos=True)
    )[0]
    full = prompt + out.token_ids
    reference = llm.compute_logits(full).log_softmax(-1)
    for i, lp in enumerate(out.logprobs):
        row = reference[len(prompt) - 1 + i]
        assert lp.token_id == out.token_ids[i]
        assert abs(lp.logprob - row[lp.token_id].item()) < 1e-4
        assert [t for t, _ in lp.top] == row.topk(3).indices.tolist()


def test_stop_token_ids_max_tokens_and_eos(llm: LLM) -> None:
    prompt = llm.tokenizer.encode("The quick brown fox")
    free = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 20
    stop_at = free.token_ids[5]
    first = free.token_ids.index(stop_at)
    out = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=(stop_at,)))[0]
    assert out.token_ids == free.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    # the model's own EOS ids stop generation unless ignore_eos
    runtime = llm.engine.runtime
    llm.engine.runtime = dataclasses.replace(runtime, eos_token_ids=(stop_at,))
    try:
        out = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0))[0]
        assert out.token_ids == free.token_ids[: first + 1] and out.stop_reason == stop_at
        out = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
        assert out.token_ids == free.token_ids
    finally:
        llm.engine.runtime = runtime


def test_stop_strings_truncate_text(llm: LLM) -> None:
    prompt = llm.tokenizer.encode("Hello world!")
    free = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    text = free.text
    stop = text[10:13]
    assert len(stop) == 3
    cut = text.index(stop)
    out = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=(stop,)))[
        0
    ]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:cut]
    assert len(out.token_ids) < 24 and out.token_ids == free.token_ids[: len(out.token_ids)]
    kept = llm.generate(
        [prompt],
        SamplingParams(
            max_tokens=24, temperature=0, ignore_eos=True, stop=(stop,), include_stop_str_in_output=True
        ),
    )[0]
    assert kept.text == text[: cut + 3]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 0},
        {"temperature": -1},
        {"top_p": 0},
        {"top_k": -2},
        {"min_p": 2},
        {"logprobs": 21},
        {"presence_penalty": 3},
        {"stop": ("",)},
        {"logit_bias": {5: 101.0}},
        {"logit_bias": {-1: 1.0}},
        {"logit_bias": ((5, 1.0), (5, 2.0))},
    ],
)
def test_bad_sampling_parameters_are_rejected(kwargs: dict) -> None:
    with pytest.raises(RequestError):
        SamplingParams(**kwargs)


def test_logit_bias_matches_transformers_sequence_bias(llm: LLM, llama_checkpoint: Path) -> None:
    """Greedy generation with a bias against the greedy choice and for another token: the same tokens as
    `transformers` with the same biases (its `sequence_bias`); beside an unbiased request in the batch."""
    from transformers import AutoModelForCausalLM

    from tests.test_models_vs_transformers import hf_generate

    prompt = llm.tokenizer.encode("The quick brown fox")
    free = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].token_ids
    bias = {free[0]: -100.0, free[3]: 4.5, 7: -2.0}
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logit_bias=bias)
    plain = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = llm.generate([prompt, prompt], [params, plain])
    hf = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    want = hf_generate(hf, prompt, 8, sequence_bias={(t,): b for t, b in bias.items()})[0]
    assert outs[0].token_ids == want and free[0] not in want
    assert outs[1].token_ids == free


def test_logit_bias_forces_and_bans_when_sampling(llm: LLM) -> None:
    """+100 on one token makes it every draw; -100 on the greedy token keeps it out of every seeded draw."""
    prompt = llm.tokenizer.encode("Hello")
    forced = llm.generate(
        [prompt],
        SamplingParams(max_tokens=6, temperature=1.0, seed=3, ignore_eos=True, logit_bias={11: 100.0}),
    )[0]
    assert forced.token_ids == [11] * 6
    top = llm.compute_logits(prompt)[-1].argmax().item()
    for seed in range(5):
        out = llm.generate(
            [prompt],
            SamplingParams(max_tokens=1, temperature=0.3, seed=seed, logit_bias={top: -100.0}),
        )[0]
        assert out.token_ids[0] != top


def test_logit_bias_outside_the_vocabulary_is_refused(llm: LLM) -> None:
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(RequestError, match="outside the vocabulary"):
        llm.generate([[1, 2]], SamplingParams(max_tokens=1, logit_bias={vocab: 1.0}))


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {
            "type": "string",
            "maxLength": 8,
        },  # random tokens inside: control characters must not appear
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "color", "ok", "n", "tags"],
    "additionalProperties": False,
}


def test_json_schema_outputs_validate_for_20_seeds(llm: LLM) -> None:
    """A random model under a JSON schema: 20 seeded samples in one batch (beside a free request) all finish
    as JSON that the schema validates (jsonschema); the free request is unconstrained."""
    import json

    import jsonschema

    prompt = llm.tokenizer.encode("Describe it as JSON")
    fmt = json.dumps({"type": "json_schema", "schema": SCHEMA})
    params = [SamplingParams(max_tokens=80, temperature=1.0, seed=s, response_format=fmt) for s in range(20)]
    free = SamplingParams(max_tokens=20, temperature=1.0, seed=0, ignore_eos=True)
    outs = llm.generate([prompt] * 21, [*params, free])
    texts = {o.text for o in outs[:20]}
    for out in outs[:20]:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert len(texts) > 1
    obj = llm.generate(
        [prompt], SamplingParams(max_tokens=200, temperature=0, response_format='{"type": "json_object"}')
    )[0]
    assert obj.finish_reason != "stop" or isinstance(json.loads(obj.text), dict)
    assert obj.text.startswith("{")


def test_an_unusable_schema_is_the_requests_error(llm: LLM) -> None:
    with pytest.raises(RequestError, match="cannot be compiled"):
        llm.generate(
            [[1, 2]],
            SamplingParams(max_tokens=4, response_format='{"type": "json_schema", "schema": {"type": 5}}'),
        )
    with pytest.raises(RequestError, match="json_object or json_schema"):
        SamplingParams(response_format='{"type": "yaml"}')
