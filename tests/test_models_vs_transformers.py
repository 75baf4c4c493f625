"""Each architecture is token-identical to `transformers` (greedy, fp32, CPU) and its logits agree within 1e-4."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from services.engine import LLM, SamplingParams
from tests.conftest import build_hf_checkpoint

PROMPTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog. Once upon a time",
    "A",
    "Prefill is bound by arithmetic; decode is bound by memory bandwidth. Running both on the same accelerator "
    "makes each slow the other, so a disaggregated system runs them on separate workers.",
    "What is the capital of France? Paris",
]
NEW_TOKENS = 32


def hf_generate(model, prompt_ids: list[int], n: int, **options) -> tuple[list[int], torch.Tensor]:  # type: ignore[no-untyped-def]
    """Greedy; `options`: more generation settings (e.g. sequence_bias)."""
    ids = torch.tensor([prompt_ids])
    # no EOS: generate exactly n tokens, as ignore_eos does on our side
    gen = GenerationConfig(
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
        **options,
    )
    model.generation_config = gen
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    return out.sequences[0, len(prompt_ids) :].tolist(), torch.cat(out.logits).float()


@pytest.fixture(scope="module")
def hf_and_ours(arch_checkpoint: tuple[str, Path]):
    arch, path = arch_checkpoint
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # a small block size and token budget: contexts span many blocks and long prompts are chunked
    llm = LLM(
        str(path), device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=24, progress=False
    )
    return arch, path, hf, llm


def test_tokenizer_matches_transformers(hf_and_ours) -> None:
    _, path, _, llm = hf_and_ours
    reference = AutoTokenizer.from_pretrained(path)
    for prompt in PROMPTS:
        assert llm.tokenizer.encode(prompt) == reference(prompt).input_ids
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]
    text = reference.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert llm.tokenizer.apply_chat_template(chat) == text
    assert llm.tokenizer.encode_chat(chat) == reference(text, add_special_tokens=False).input_ids


def test_greedy_batch_is_token_identical(hf_and_ours) -> None:
    arch, _, hf, llm = hf_and_ours
    prompt_ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompt_ids}) == len(prompt_ids), "prompts must differ in length"
    outs = llm.generate(
        prompt_ids, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=5)
    )
    for ids, out in zip(prompt_ids, outs, strict=True):
        ref_tokens, ref_logits = hf_generate(hf, ids, NEW_TOKENS)
        assert len(ref_tokens) == NEW_TOKENS
        assert out.token_ids == ref_tokens, f"{arch}: prompt of {len(ids)} tokens diverged"
        # each decode step's top-5 logprobs against the reference's logits at that step
        ref_logprobs = ref_logits.log_softmax(-1)
        for step, lp in enumerate(out.logprobs):
            top_ids = [t for t, _ in lp.top]
            assert top_ids[0] == ref_tokens[step]
            ours = torch.tensor([v for _, v in lp.top])
            assert torch.allclose(ours, ref_logprobs[step, top_ids], atol=1e-4, rtol=0)


def test_logits_agree_within_1e4(hf_and_ours) -> None:
    arch, _, hf, llm = hf_and_ours
    ids = llm.tokenizer.encode(PROMPTS[3]) + llm.tokenizer.encode(PROMPTS[1])
    ours = llm.compute_logits(ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4, f"{arch}: max |logit difference| {diff:.2e}"


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    path = build_hf_checkpoint(tmp_path / "sharded", "qwen3", seed=3, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("*.safetensors"))) > 2
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), device="cpu", dtype="float32", progress=False)
    ids = llm.tokenizer.encode(PROMPTS[1])
    out = llm.generate([ids], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == hf_generate(hf, ids, 16)[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_make_tiny_model_matches_transformers(tmp_path: Path, arch: str) -> None:
    """`pdmesh make-tiny-model` writes checkpoints that transformers reads the same way."""
    from services.engine.tiny_model import make_tiny_model

    path = make_tiny_model(tmp_path / arch, arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), device="cpu", dtype="float32", progress=False)
    ids = llm.tokenizer.encode(PROMPTS[0])
    out = llm.generate([ids], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == hf_generate(hf, ids, 12)[0]
