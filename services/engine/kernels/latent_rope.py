"""Latent attention's rotary part and cache write in one kernel, one program per token: the query's rotary part
(every head) rotated in place; the latent row (the normed compressed KV, then the rotated shared key part) written
to a new tensor and, where the slot is not -1, to the paged cache.

Rounding follows the reference implementation, as in kernels/rope_store.py (whose rotation it shares).
Interleaved rotary (DeepSeek) pairs (x0, x1), (x2, x3), ... and writes the rotated pairs as two halves, as the
reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.engine.kernels.rope_store import cos_sin, rotate_pair


@triton.jit
def _rotated(ptr, rows, stride, d, cos, sin, mask, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    lo = ptr + rows[:, None] * stride + (2 * d if INTERLEAVED else d)[None, :]
    x1 = tl.load(lo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(lo + (1 if INTERLEAVED else HALF), mask=mask, other=0.0).to(tl.float32)
    return rotate_pair(x1, x2, cos, sin, ptr.dtype.element_ty)


@triton.jit
def _latent_rope_kernel(
    q_ptr,
    k_ptr,
    c_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    slot_ptr,
    latent_ptr,
    cache_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_ct,
    stride_lt,
    stride_cb,
    stride_cs,
    block_size,
    heads,
    COMPRESSED: tl.constexpr,
    HALF: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, BLOCK_HALF)
    dmask = d < HALF
    cos, sin = cos_sin(cos_ptr, sin_ptr, pos, d, dmask, HALF, q_ptr.dtype.element_ty)
    h = tl.arange(0, BLOCK_H)
    qmask = (h < heads)[:, None] & dmask[None, :]
    q1, q2 = _rotated(q_ptr + t * stride_qt, h, stride_qh, d, cos, sin, qmask, HALF, INTERLEAVED)
    tl.debug_barrier()  # interleaved: every lane has read its pair before any writes over it (in place)
    q_out = q_ptr + t * stride_qt + h[:, None] * stride_qh + d[None, :]
    tl.store(q_out, q1, mask=qmask)
    tl.store(q_out + HALF, q2, mask=qmask)
    one = tl.arange(0, 1)
    kmask = (one < 1)[:, None] & dmask[None, :]
    k1, k2 = _rotated(k_ptr + t * stride_kt, one, 0, d, cos, sin, kmask, HALF, INTERLEAVED)
    c = tl.arange(0, BLOCK_C)
    cmask = c < COMPRESSED
    compressed = tl.load(c_ptr + t * stride_ct + c, mask=cmask)
    _write_latent(latent_ptr + t * stride_lt, c, cmask, compressed, d, kmask, k1, k2, COMPRESSED, HALF)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        row = cache_ptr + (slot // block_size) * stride_cb + (slot % block_size) * stride_cs
        _write_latent(row, c, cmask, compressed, d, kmask, k1, k2, COMPRESSED, HALF)


@triton.jit
def _write_latent(row, c, cmask, compressed, d, kmask, k1, k2, COMPRESSED: tl.constexpr, HALF: tl.constexpr):
    ty = row.dtype.element_ty
    tl.store(row + c, compressed.to(ty), mask=cmask)
    rot = row + COMPRESSED + d[None, :]
    tl.store(rot, k1.to(ty), mask=kmask)
    tl.store(rot + HALF, k2.to(ty), mask=kmask)


def rope_latent(
    q_rot: torch.Tensor,
    k_rot: torch.Tensor,
    compressed: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
    slot_mapping: torch.Tensor,
    cache: torch.Tensor,
) -> torch.Tensor:
    """q_rot [T, H, R] rotated in place; returns the latents [T, C + R] (compressed [T, C], then k_rot [T, R]
    rotated), also stored at each token's slot of cache [blocks, block_size, 1, C + R] (a strided view; slot -1:
    not stored). Any row strides; the last dimension contiguous. cos/sin [max_pos, R / 2] float32."""
    tokens, heads, rope = q_rot.shape
    dim = compressed.shape[1] + rope
    assert k_rot.shape == (tokens, rope) and compressed.shape[0] == tokens and rope % 2 == 0
    assert q_rot.stride(2) == k_rot.stride(1) == compressed.stride(1) == 1, (
        "the last dimension must be contiguous"
    )
    assert cache.shape[2:] == (1, dim) and cache.stride(3) == 1 and slot_mapping.shape == positions.shape
    assert cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and cos.shape[1] == rope // 2
    latent = compressed.new_empty(tokens, dim)
    if tokens == 0:
        return latent
    half = rope // 2
    _latent_rope_kernel[(tokens,)](
        q_rot,
        k_rot,
        compressed,
        positions,
        cos,
        sin,
        slot_mapping,
        latent,
        cache,
        q_rot.stride(0),
        q_rot.stride(1),
        k_rot.stride(0),
        compressed.stride(0),
        latent.stride(0),
        cache.stride(0),
        cache.stride(1),
        cache.shape[1],
        heads,
        COMPRESSED=compressed.shape[1],
        HALF=half,
        INTERLEAVED=interleaved,
        BLOCK_C=triton.next_power_of_2(compressed.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_H=triton.next_power_of_2(heads),
    )
    return latent
