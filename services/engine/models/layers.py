"""Building blocks shared by the model definitions.

Parameters are allocated uninitialised (`torch.empty`) on the target device and dtype: the loader copies each
checkpoint tensor straight into its parameter, so a model is never built twice. A parameter that packs several
checkpoint tensors (q/k/v into `qkv_proj`, gate/up into `gate_up_proj`) records its shards as
`param.shards = {name: (offset, size)}` along dimension 0; the loader fills each shard exactly once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.model_config import RopeConfig


def _param(*shape: int, shards: dict[str, tuple[int, int]] | None = None) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape), requires_grad=False)
    p.shards = shards  # type: ignore[attr-defined]
    return p


class Linear(nn.Module):
    """y = x W^T (+ b). `out_shards` packs several checkpoint projections into one matmul."""

    def __init__(self, in_features: int, out_shards: dict[str, int] | int, bias: bool = False) -> None:
        super().__init__()
        if isinstance(out_shards, int):
            sizes, shards = out_shards, None
        else:
            offsets = [0, *torch.tensor(list(out_shards.values())).cumsum(0).tolist()]
            shards = {n: (offsets[i], s) for i, (n, s) in enumerate(out_shards.items())}
            sizes = offsets[-1]
        self.weight = _param(sizes, in_features, shards=shards)
        self.bias = _param(sizes, shards=shards) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] == 1 and _fused(x):
            # one row (decode at batch 1): a GEMV kernel streams the weight faster than the BLAS library does
            from services.engine.kernels.gemv import gemv

            return gemv(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.weight = _param(num_embeddings, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def _fused(x: torch.Tensor) -> bool:
    """Whether the Triton kernels serve this tensor (CUDA with Triton installed)."""
    from services.engine import kernels

    return x.is_cuda and kernels.available(x.device)


class RMSNorm(nn.Module):
    """RMSNorm; with `residual`, first adds it (x + residual) and returns (normed, sum), as one kernel on GPU."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _param(dim)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if _fused(x) and x.dim() == 2:
            from services.engine.kernels.norm import rmsnorm

            return rmsnorm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: normalise in fp32 and cast back before the weight, as the reference implementation does;
        # other orders change bf16 results.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if _fused(gate_up):
        from services.engine.kernels.activation import silu_and_mul as fused

        return fused(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate halves) with a cos/sin table for every position."""

    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig) -> None:
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_inv_freq(head_dim, rope))
        self.register_buffer("cos", freqs.cos(), persistent=False)  # [max_positions, head_dim / 2]
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x: [tokens, heads, head_dim] -> same shape, rotated by each token's position."""
        cos = self.cos[positions].unsqueeze(1).to(x.dtype)
        sin = self.sin[positions].unsqueeze(1).to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
