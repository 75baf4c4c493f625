"""Rotary embedding applied in place to q and k, and k/v stored into the paged cache, in one kernel; optionally
q and k each RMS-normed per head first (Qwen3's q_norm / k_norm).

One program per token. Slot -1 means "do not store" (padded rows of a CUDA graph). Rounding follows the reference
implementation: the norm in fp32, rounded to the model dtype before its weight and after; cos/sin rounded to the
model dtype, each product rounded, then the sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def cos_sin(cos_ptr, sin_ptr, pos, d, dmask, HALF: tl.constexpr, ty: tl.constexpr):
    """A position's cos/sin [1, HALF], rounded to the model dtype as the reference rounds them."""
    cos = tl.load(cos_ptr + pos * HALF + d, mask=dmask, other=0.0).to(ty).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + pos * HALF + d, mask=dmask, other=0.0).to(ty).to(tl.float32)[None, :]
    return cos, sin


@triton.jit
def rotate_pair(x1, x2, cos, sin, ty: tl.constexpr):
    """(x1, x2) rotated, each product rounded to the model dtype, then the sum."""
    o1 = ((x1 * cos).to(ty).to(tl.float32) - (x2 * sin).to(ty).to(tl.float32)).to(ty)
    o2 = ((x2 * cos).to(ty).to(tl.float32) + (x1 * sin).to(ty).to(tl.float32)).to(ty)
    return o1, o2


@triton.jit
def _rotate(x_ptr, offs_h, stride_h, d, half, cos, sin, mask, w_ptr, eps, NORM: tl.constexpr):
    lo = x_ptr + offs_h[:, None] * stride_h + d[None, :]
    x1 = tl.load(lo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(lo + half, mask=mask, other=0.0).to(tl.float32)
    ty = x_ptr.dtype.element_ty
    if NORM:
        rms = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * half) + eps)[:, None]
        w1 = tl.load(w_ptr + d, mask=d < half, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + half + d, mask=d < half, other=0.0).to(tl.float32)[None, :]
        x1 = (w1 * (x1 * rms).to(ty).to(tl.float32)).to(ty).to(tl.float32)
        x2 = (w2 * (x2 * rms).to(ty).to(tl.float32)).to(ty).to(tl.float32)
    o1, o2 = rotate_pair(x1, x2, cos, sin, ty)
    tl.store(lo, o1, mask=mask)
    tl.store(lo + half, o2, mask=mask)
    return o1, o2


@triton.jit
def _rope_store_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    slot_ptr,
    k_cache_ptr,
    v_cache_ptr,
    q_norm_ptr,
    k_norm_ptr,
    eps,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_ct,
    stride_ch,
    block_size,
    num_q_heads,
    num_kv_heads,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    NORM: tl.constexpr,
):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, BLOCK_HALF)
    dmask = d < HALF
    cos, sin = cos_sin(cos_ptr, sin_ptr, pos, d, dmask, HALF, q_ptr.dtype.element_ty)
    hq = tl.arange(0, BLOCK_HQ)
    qmask = (hq < num_q_heads)[:, None] & dmask[None, :]
    _rotate(q_ptr + t * stride_qt, hq, stride_qh, d, HALF, cos, sin, qmask, q_norm_ptr, eps, NORM)
    hk = tl.arange(0, BLOCK_HKV)
    kmask = (hk < num_kv_heads)[:, None] & dmask[None, :]
    k1, k2 = _rotate(k_ptr + t * stride_kt, hk, stride_kh, d, HALF, cos, sin, kmask, k_norm_ptr, eps, NORM)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        base = (
            (slot // block_size) * stride_cb
            + (slot % block_size) * stride_ct
            + hk[:, None] * stride_ch
            + d[None, :]
        )
        tl.store(k_cache_ptr + base, k1, mask=kmask)
        tl.store(k_cache_ptr + base + HALF, k2, mask=kmask)
        v_lo = v_ptr + t * stride_vt + hk[:, None] * stride_vh + d[None, :]
        tl.store(v_cache_ptr + base, tl.load(v_lo, mask=kmask), mask=kmask)
        tl.store(v_cache_ptr + base + HALF, tl.load(v_lo + HALF, mask=kmask), mask=kmask)


def rope_and_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    norms: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> None:
    """In place: q, k (RMS-normed per head first with norms = (q weight, k weight, eps)) rotated by position.
    Stored: rotated k and v at each token's slot.

    q [T, Hq, D], k/v [T, Hkv, D] (any row/head strides, contiguous head_dim); cos/sin [max_pos, D/2] float32;
    k_cache/v_cache [num_blocks, block_size, Hkv, D] strided views of the KV pool.
    """
    tokens, hq, head_dim = q.shape
    hkv = k.shape[1]
    assert k.shape == v.shape == (tokens, hkv, head_dim) and head_dim % 2 == 0
    assert q.stride(2) == k.stride(2) == v.stride(2) == 1, "head_dim must be contiguous"
    assert k_cache.shape[1:] == (k_cache.shape[1], hkv, head_dim) and k_cache.stride(3) == 1
    assert k_cache.stride() == v_cache.stride() and k_cache.dtype == q.dtype == k.dtype == v.dtype
    assert positions.shape == slot_mapping.shape == (tokens,) and cos.shape[1] == head_dim // 2
    assert cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous()
    if norms is not None:
        assert (
            norms[0].shape == norms[1].shape == (head_dim,)
            and norms[0].is_contiguous()
            and norms[1].is_contiguous()
        )
    if tokens == 0:
        return
    half = head_dim // 2
    _rope_store_kernel[(tokens,)](
        q,
        k,
        v,
        positions,
        cos,
        sin,
        slot_mapping,
        k_cache,
        v_cache,
        norms[0] if norms else q,
        norms[1] if norms else q,
        norms[2] if norms else 0.0,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        k_cache.shape[1],
        hq,
        hkv,
        HALF=half,
        BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_HQ=triton.next_power_of_2(hq),
        BLOCK_HKV=triton.next_power_of_2(hkv),
        NORM=norms is not None,
    )
