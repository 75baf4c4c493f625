"""Building blocks shared by the model definitions.

Parameters are allocated uninitialised (`torch.empty`) on the target device and dtype: the loader copies each
checkpoint tensor straight into its parameter, so a model is never built twice. Every parameter carries
`param.shards`: for each checkpoint tensor that lands in it (keyed, e.g. "q" of a packed q/k/v projection or
("gate", 3) of stacked experts), where it goes (`dest`, a view of the parameter) and which part of the checkpoint
tensor this rank keeps (`source`, for tensor parallelism). The loader fills each shard exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.model_config import RopeConfig


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class Shard:
    dest: Callable[[torch.Tensor], torch.Tensor] = _whole  # parameter data -> where this tensor goes
    source: Callable[[torch.Tensor], torch.Tensor] = _whole  # checkpoint tensor -> the part kept here


def narrow(dim: int, start: int, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t.narrow(dim, start, size)


def _param(*shape: int, shards: dict[Hashable, Shard] | None = None) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape), requires_grad=False)
    p.shards = shards or {None: Shard()}  # type: ignore[attr-defined]
    return p


def packed(sizes: dict[str, int], dim: int = 0) -> tuple[int, dict[Hashable, Shard]]:
    """Checkpoint tensors laid end to end along `dim`: (total size, their shards)."""
    shards: dict[Hashable, Shard] = {}
    offset = 0
    for name, size in sizes.items():
        shards[name] = Shard(dest=narrow(dim, offset, size))
        offset += size
    return offset, shards


class Linear(nn.Module):
    """y = x W^T (+ b). `out_shards` packs several checkpoint projections into one matmul."""

    def __init__(self, in_features: int, out_shards: dict[str, int] | int, bias: bool = False) -> None:
        super().__init__()
        if isinstance(out_shards, int):
            size, shards = out_shards, None
        else:
            size, shards = packed(out_shards)
        self.weight = _param(size, in_features, shards=shards)
        self.bias = _param(size, shards=shards) if bias else None

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
        if _fused(x) and (x.dim() == 2 or (x.dim() == 3 and residual is None)) and x.stride(-1) == 1:
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


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_attention_factor(rope: RopeConfig) -> float:
    """How much YaRN scales cos/sin (1 for the other rope types)."""
    if rope.rope_type != "yarn":
        return 1.0
    if rope.attention_factor is not None:
        return float(rope.attention_factor)
    if rope.mscale and rope.mscale_all_dim:
        return _yarn_mscale(rope.factor, rope.mscale) / _yarn_mscale(rope.factor, rope.mscale_all_dim)
    return _yarn_mscale(rope.factor)


def yarn_softmax_scale(rope: RopeConfig, scale: float) -> float:
    """DeepSeek's YaRN also rescales the attention softmax by mscale(all_dim)^2."""
    if rope.rope_type != "default" and rope.mscale_all_dim:
        m = _yarn_mscale(rope.factor, rope.mscale_all_dim)
        return scale * m * m
    return scale


def _yarn_inv_freq(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    pos_freqs = rope.theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (rope.factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
            2 * math.log(rope.theta)
        )

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    ramp = torch.clamp(
        (torch.arange(head_dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001), 0, 1
    )
    keep = 1 - ramp  # 1: extrapolate (high frequencies kept), 0: interpolate
    return interpolation * (1 - keep) + extrapolation * keep


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "yarn":
        return _yarn_inv_freq(head_dim, rope)
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
    """Rotary embedding with a cos/sin table for every position. Neox style (the two halves of the head are the
    pairs) by default; `interleaved` (DeepSeek) pairs (x0, x1), (x2, x3), ... and returns them as two halves, as
    the reference implementation does (q and k alike, so attention scores are the same)."""

    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig) -> None:
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_inv_freq(head_dim, rope))
        factor = rope_attention_factor(rope)
        self.interleaved = rope.interleaved
        self.register_buffer("cos", freqs.cos() * factor, persistent=False)  # [max_positions, head_dim / 2]
        self.register_buffer("sin", freqs.sin() * factor, persistent=False)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x: [tokens, heads, head_dim] -> same shape, rotated by each token's position."""
        cos = self.cos[positions].unsqueeze(1).to(x.dtype)
        sin = self.sin[positions].unsqueeze(1).to(x.dtype)
        x1, x2 = (x[..., 0::2], x[..., 1::2]) if self.interleaved else x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
