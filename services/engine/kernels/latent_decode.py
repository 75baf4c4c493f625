"""Paged decode attention over latents (multi-head latent attention, absorbed): one query token per sequence,
every query head against one shared latent per cached token, which is both the key (all of it: the compressed
part and the rotary part) and the value (the compressed part alone).

Like kernels/decode_attention.py (split context, online softmax, a second pass merging the splits by
log-sum-exp, which it reuses), but the key is read as its two parts, each tile at its own width, so a 512 + 64
latent costs 576 columns rather than a 1024-wide padded head, and the value is the same tile as the key's first
part, read once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.engine.kernels.decode_attention import LOG2E, merge_splits, num_splits_for, split_buffers


@triton.jit
def _latent_partition_kernel(
    q_ptr,
    q_rope_ptr,
    cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    lse_ptr,
    stride_qs,
    stride_qh,
    stride_rs,
    stride_rh,
    stride_cb,
    stride_ct,
    stride_bt,
    stride_os,
    stride_oh,
    stride_op,
    stride_ls,
    stride_lh,
    scale_log2,
    block_size,
    heads,
    VALUE: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    DIRECT: tl.constexpr,
):
    seq, head_block, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    splits = tl.num_programs(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    h = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    v = tl.arange(0, BLOCK_V)
    r = tl.arange(0, BLOCK_R)
    hmask, vmask, rmask = h < heads, v < VALUE, r < ROPE
    chunk = tl.cdiv(tl.cdiv(seq_len, splits), BLOCK_N) * BLOCK_N
    start = part * chunk
    if start >= seq_len:
        tl.store(lse_ptr + seq * stride_ls + h * stride_lh + part, float("-inf"), mask=hmask)
        return
    end = tl.minimum(start + chunk, seq_len)
    q_main = tl.load(
        q_ptr + seq * stride_qs + h[:, None] * stride_qh + v[None, :],
        mask=hmask[:, None] & vmask[None, :],
        other=0.0,
    )
    q_rope = tl.load(
        q_rope_ptr + seq * stride_rs + h[:, None] * stride_rh + r[None, :],
        mask=hmask[:, None] & rmask[None, :],
        other=0.0,
    )
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_V], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        page = tl.load(block_tables_ptr + seq * stride_bt + n // block_size, mask=nmask, other=0).to(tl.int64)
        rows = cache_ptr + page[:, None] * stride_cb + (n % block_size)[:, None] * stride_ct
        main = tl.load(rows + v[None, :], mask=nmask[:, None] & vmask[None, :], other=0.0)
        rope = tl.load(rows + VALUE + r[None, :], mask=nmask[:, None] & rmask[None, :], other=0.0)
        s = tl.dot(q_main, tl.trans(main), input_precision=PRECISION)
        s += tl.dot(q_rope, tl.trans(rope), input_precision=PRECISION)
        s = tl.where(nmask[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        denom = denom * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(main.dtype), main, input_precision=PRECISION)
        m = m_new
    out = acc / denom[:, None]
    omask = hmask[:, None] & vmask[None, :]
    if DIRECT:  # one split: this is the final output, in the model's dtype
        dst = out_ptr + seq * stride_os + h[:, None] * stride_oh + v[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        dst = out_ptr + seq * stride_os + h[:, None] * stride_oh + part * stride_op + v[None, :]
        tl.store(dst, out, mask=omask)
        tl.store(lse_ptr + seq * stride_ls + h * stride_lh + part, m + tl.log2(denom), mask=hmask)


def latent_decode_attention(
    q: torch.Tensor,
    q_rope: torch.Tensor,
    cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sm_count: int,
    config: tuple[int, int, int] = (32, 4, 2),
    splits: int | None = None,
) -> torch.Tensor:
    """The query in two parts, q [S, H, V] (against each cached latent's first V columns, which are also the
    values) and q_rope [S, H, R] (against the last R), any row and head strides, over cache [blocks, block_size,
    1, V + R] (a strided view) -> [S, H, V]. block_tables [>=S, max_blocks] int32, seq_lens [>=S] int32 (each
    >= 1). config: (BLOCK_N, warps, stages); splits: of each context (default: one program per SM, by SM count).
    Defaults from bench/latent_decode.py on an H200 (16 heads, b128/b256 x 1024 tokens: 1.7x the former
    (32, 8, 2) with 4 programs per SM, whose larger tiles and extra splits cost more than they hid)."""
    seqs, heads, value_dim = q.shape
    rope = q_rope.shape[2]
    dim = value_dim + rope
    assert q_rope.shape[:2] == (seqs, heads) and q.stride(2) == 1 and (rope == 0 or q_rope.stride(2) == 1)
    assert cache.shape[2] == 1 and cache.shape[3] == dim and cache.stride(3) == 1
    assert block_tables.dtype == torch.int32
    out = q.new_empty(seqs, heads, value_dim)
    if seqs == 0:
        return out
    block_h = min(64, max(16, triton.next_power_of_2(heads)))
    head_blocks = triton.cdiv(heads, block_h)
    splits = splits or num_splits_for(seqs, head_blocks, sm_count, per_sm=1)
    block_n, warps, stages = config
    block_v = triton.next_power_of_2(value_dim)
    direct = splits == 1
    partials, lse = split_buffers(out, splits, block_v)
    _latent_partition_kernel[(seqs, head_blocks, splits)](
        q,
        q_rope,
        cache,
        block_tables,
        seq_lens,
        partials,
        lse,
        q.stride(0),
        q.stride(1),
        q_rope.stride(0),
        q_rope.stride(1),
        cache.stride(0),
        cache.stride(1),
        block_tables.stride(0),
        partials.stride(0),
        partials.stride(1),
        0 if direct else partials.stride(2),
        lse.stride(0),
        lse.stride(1),
        scale * LOG2E,
        cache.shape[1],
        heads,
        VALUE=value_dim,
        ROPE=rope,
        BLOCK_V=block_v,
        BLOCK_R=max(16, triton.next_power_of_2(max(rope, 1))),
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        DIRECT=direct,
        num_warps=warps,
        num_stages=stages,
    )
    if not direct:
        merge_splits(partials, lse, out, value_dim)
    return out
