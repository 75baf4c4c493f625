"""Attention backends, chosen by name at start-up."""

from __future__ import annotations

from services.engine.attention.base import AttentionBackend, AttentionMetadata, BoundAttention
from services.engine.kv_cache import KVCache

BACKENDS = ("torch",)


def make_backend(name: str, kv_cache: KVCache, scale: float) -> AttentionBackend:
    if name == "torch":
        from services.engine.attention.torch_backend import TorchAttention

        return TorchAttention(kv_cache, scale)
    raise ValueError(f"unknown attention backend '{name}'; choose one of: {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "AttentionBackend", "AttentionMetadata", "BoundAttention", "make_backend"]
