"""Attention backends, chosen by name at start-up."""

from __future__ import annotations

import torch

from services.engine.attention.base import AttentionBackend, AttentionMetadata, BoundAttention
from services.engine.kv_cache import KVCache

BACKENDS = ("auto", "torch", "triton", "aiter")


def resolve_backend(name: str, device: torch.device) -> str:
    """auto: triton on CUDA when Triton is installed, else the torch reference."""
    from services.engine import kernels

    if name == "auto":
        return "triton" if device.type == "cuda" and kernels.available(device) else "torch"
    if name == "triton" and not kernels.available(device):
        raise ValueError(
            f"the triton attention backend needs a CUDA device and Triton installed (device: {device})"
        )
    return name


def make_backend(name: str, kv_cache: KVCache, scale: float, max_model_len: int) -> AttentionBackend:
    if name == "torch":
        from services.engine.attention.torch_backend import TorchAttention

        return TorchAttention(kv_cache, scale, max_model_len)
    if name == "triton":
        from services.engine.attention.triton_backend import TritonAttention

        return TritonAttention(kv_cache, scale, max_model_len)
    if name == "aiter":
        from services.engine.rocm.aiter_attention import AiterAttention

        return AiterAttention(kv_cache, scale, max_model_len)
    raise ValueError(f"unknown attention backend '{name}'; choose one of: {', '.join(BACKENDS)}")


__all__ = [
    "BACKENDS",
    "AttentionBackend",
    "AttentionMetadata",
    "BoundAttention",
    "make_backend",
    "resolve_backend",
]
