"""Shared fixtures: tiny random checkpoints built with `transformers` (the oracle), never downloaded."""

from __future__ import annotations

import os

import torch

# NOTE: before anything imports Triton: without a GPU, Triton kernels run in Triton's interpreter so their logic is
# still checked against PyTorch
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest

from services.engine.tiny_model import build_tokenizer, write_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ARCHS = ("llama", "qwen2", "qwen3")


def hf_config(arch: str, vocab_size: int, **overrides: object):
    """A small config per architecture, each exercising its distinguishing feature."""
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=3,
    )
    common.update(overrides)
    if arch == "llama":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        }
        return transformers.LlamaConfig(rope_parameters=rope, tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(tie_word_embeddings=True, **common)
    if arch == "qwen3":
        return transformers.Qwen3Config(tie_word_embeddings=False, **common)
    raise ValueError(arch)


def build_hf_checkpoint(
    path: Path, arch: str, seed: int = 0, max_shard_size: str = "1GB", **overrides: object
) -> Path:
    """Save a random `transformers` model and our tokenizer to path. Weights are spread wider than the default
    initialisation so that greedy decoding has clear winners (no near-ties that rounding could flip)."""
    import transformers

    tok = build_tokenizer()
    cfg = hf_config(arch, tok.get_vocab_size(), **overrides)
    torch.manual_seed(seed)
    model = {
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "qwen3": transformers.Qwen3ForCausalLM,
    }[arch](cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.05 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if cfg.tie_word_embeddings else 1.0))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    write_tokenizer(tok, path)
    return path


@pytest.fixture(scope="session", params=ARCHS)
def arch_checkpoint(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    arch = request.param
    return arch, build_hf_checkpoint(tmp_path_factory.mktemp(f"hf-{arch}"), arch)


@pytest.fixture(scope="session")
def llama_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hf_checkpoint(tmp_path_factory.mktemp("hf-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.engine.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def dense(llama_checkpoint: Path) -> Path:
    """The dense model of the parallel tests."""
    return llama_checkpoint


@pytest.fixture(scope="session")
def moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3-MoE checkpoint."""
    from tests.test_moe_models import build

    path = tmp_path_factory.mktemp("moe")
    build("qwen3_moe", path)
    return path
