"""MoE models against `transformers`: Qwen3-MoE, Mixtral, DeepSeek-V3 (MLA, sigmoid grouped routing with a
correction bias, shared experts) and DeepSeek-V2 (softmax group-limited routing, no q LoRA); greedy tokens
identical, logits within 1e-4 (CPU, fp32). Each checkpoint is built here with transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from services.engine import LLM, SamplingParams
from services.engine.tiny_model import build_tokenizer, write_tokenizer
from tests.test_models_vs_transformers import hf_generate

TOKENIZER = build_tokenizer()
COMMON = dict(
    vocab_size=TOKENIZER.get_vocab_size(),
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=1024,
    bos_token_id=0,
    eos_token_id=3,
)
DEEPSEEK = dict(
    intermediate_size=96,
    moe_intermediate_size=32,
    num_key_value_heads=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
)
CASES = {
    "qwen3_moe": (
        transformers.Qwen3MoeForCausalLM,
        lambda: transformers.Qwen3MoeConfig(
            intermediate_size=96,
            moe_intermediate_size=32,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[1],
            **COMMON,
        ),
    ),
    "mixtral": (
        transformers.MixtralForCausalLM,
        lambda: transformers.MixtralConfig(
            intermediate_size=32, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **COMMON
        ),
    ),
    "deepseek_v3": (
        transformers.DeepseekV3ForCausalLM,
        lambda: transformers.DeepseekV3Config(
            n_shared_experts=1, q_lora_rank=24, routed_scaling_factor=2.5, **DEEPSEEK, **COMMON
        ),
    ),
    "deepseek_v2": (
        transformers.DeepseekV2ForCausalLM,
        lambda: transformers.DeepseekV2Config(
            n_shared_experts=2, q_lora_rank=None, topk_method="group_limited_greedy", **DEEPSEEK, **COMMON
        ),
    ),
}


def build(name: str, path: Path, seed: int = 0):  # type: ignore[no-untyped-def]
    cls, config = CASES[name]
    torch.manual_seed(seed)
    model = cls(config())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in [*model.named_parameters(), *model.named_buffers()]:
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.05 * torch.randn(p.shape, generator=gen))
            elif "embed" in n:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "e_score_correction_bias" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif p.is_floating_point() and "inv_freq" not in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    model.save_pretrained(path)
    write_tokenizer(TOKENIZER, path)
    return model.eval()


@pytest.mark.parametrize("name", list(CASES))
def test_moe_model_matches_transformers(name: str, tmp_path: Path) -> None:
    hf = build(name, tmp_path)
    llm = LLM(
        str(tmp_path), device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=16, progress=False
    )
    prompts = [[0, *range(5, 5 + n)] for n in (3, 20, 41)]  # the long one is prefilled in 3 chunks
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_generate(hf, prompt, 16)[0], (
            f"{name}: a {len(prompt)}-token prompt diverged"
        )
    full = prompts[2] + outs[2].token_ids
    with torch.no_grad():
        ref = hf(torch.tensor([full])).logits[0]
    assert (llm.compute_logits(full) - ref).abs().max().item() <= 1e-4


def test_latent_cache_layout(tmp_path: Path) -> None:
    """MLA caches one latent (kv_lora_rank + rope dims) per token and layer: no K/V split, far fewer bytes."""
    build("deepseek_v3", tmp_path)
    llm = LLM(str(tmp_path), device="cpu", dtype="float32", block_size=4, num_blocks=64, progress=False)
    layout = llm.engine.kv_cache.layout
    assert (layout.parts, layout.num_kv_heads, layout.head_dim) == (1, 1, 16 + 8)
    assert "P1" in llm.engine.layout_fingerprint


def test_latent_attention_of_a_padded_decode_batch_reads_only_its_rows(tmp_path: Path) -> None:
    """Prefill graphs hand a layer's attention static buffers longer than the batch (padding rows past its
    tokens): a batch of decodes only attends over its own sequences and gives what the unpadded rows give."""
    from services.engine.attention import AttentionMetadata, BoundAttention

    build("deepseek_v2", tmp_path)
    llm = LLM(str(tmp_path), device="cpu", dtype="float32", block_size=4, num_blocks=64, progress=False)
    engine = llm.engine
    mla = engine.model.model.layers[1].self_attn
    cache = engine.kv_cache.latent(1)
    torch.manual_seed(0)
    cache.copy_(torch.randn_like(cache))
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([20, 38]),
        query_start_loc=torch.tensor([0, 1, 2], dtype=torch.int32),
        seq_lens=torch.tensor([5, 11], dtype=torch.int32),
        block_tables=torch.tensor([[3, 5, 0], [7, 8, 9]], dtype=torch.int32),
        query_lens_cpu=(1, 1),
        seq_lens_cpu=(5, 11),
        num_decode_seqs=2,
    )
    attn = BoundAttention(engine.runner.backend, meta)
    heads, dims = mla.num_heads, mla.mla
    q = torch.randn(6, heads, dims.qk_head_dim)  # 2 decodes, 4 rows of padding
    latent = torch.randn(6, dims.latent_dim)
    with torch.no_grad():
        padded = mla._attention(attn, q, latent)
        alone = mla._attention(attn, q[:2], latent[:2])
    assert padded.shape[0] >= 2 and torch.equal(padded[:2], alone)
