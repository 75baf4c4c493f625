"""Paged decode attention: one query token per sequence against its paged KV, split along the context.

Pass 1, grid (sequences, kv heads, splits): each program takes one of `splits` equal slices of its sequence's
context (sized in the kernel from the sequence's length, so one grid serves every length: CUDA-graph safe) for
one KV head and all the query heads that share it (GQA), so each K/V tile is read once per group. It keeps an
online softmax and writes the slice's normalised output and log-sum-exp (base 2).
Pass 2, grid (sequences, query heads): combines the slices. With one split, pass 1 writes the output directly.
The number of splits follows the batch: enough programs to fill the GPU, no more.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _decode_partition_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    lse_ptr,
    stride_qt,
    stride_qh,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_bt,
    stride_ot,
    stride_oh,
    stride_op,
    stride_lt,
    stride_lh,
    scale_log2,
    block_size,
    group,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    DIRECT: tl.constexpr,
):
    seq, kv_head, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    splits = tl.num_programs(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gmask, dmask = g < group, d < HEAD_DIM
    heads = kv_head * group + g
    chunk = tl.cdiv(tl.cdiv(seq_len, splits), BLOCK_N) * BLOCK_N
    start = part * chunk
    if start >= seq_len:
        tl.store(lse_ptr + seq * stride_lt + heads * stride_lh + part, float("-inf"), mask=gmask)
        return
    end = tl.minimum(start + chunk, seq_len)
    q = tl.load(
        q_ptr + seq * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=gmask[:, None] & dmask[None, :],
        other=0.0,
    )
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        page = tl.load(block_tables_ptr + seq * stride_bt + n // block_size, mask=nmask, other=0).to(tl.int64)
        offs = (
            page[:, None] * stride_cb
            + (n % block_size)[:, None] * stride_ct
            + kv_head * stride_ch
            + d[None, :]
        )
        kvmask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + offs, mask=kvmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = tl.where(nmask[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        denom = denom * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + offs, mask=kvmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    out = acc / denom[:, None]
    omask = gmask[:, None] & dmask[None, :]
    if DIRECT:  # one split: this is the final output, in the model's dtype
        tl.store(
            out_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=omask,
        )
    else:
        tl.store(
            out_ptr + seq * stride_ot + heads[:, None] * stride_oh + part * stride_op + d[None, :],
            out,
            mask=omask,
        )
        tl.store(lse_ptr + seq * stride_lt + heads * stride_lh + part, m + tl.log2(denom), mask=gmask)


@triton.jit
def _decode_reduce_kernel(
    part_ptr,
    lse_ptr,
    out_ptr,
    num_partitions,
    stride_pt,
    stride_ph,
    stride_pp,
    stride_lt,
    stride_lh,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    seq, head = tl.program_id(0), tl.program_id(1)
    p = tl.arange(0, BLOCK_P)
    d = tl.arange(0, BLOCK_D)
    pmask, dmask = p < num_partitions, d < HEAD_DIM
    lse = tl.load(lse_ptr + seq * stride_lt + head * stride_lh + p, mask=pmask, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp2(lse - top)
    parts = tl.load(
        part_ptr + seq * stride_pt + head * stride_ph + p[:, None] * stride_pp + d[None, :],
        mask=pmask[:, None] & dmask[None, :] & (lse > float("-inf"))[:, None],
        other=0.0,
    )
    out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=dmask)


def num_splits_for(
    num_seqs: int, num_kv_heads: int, sm_count: int, max_splits: int = 32, per_sm: int = 4
) -> int:
    """Enough programs to give every SM `per_sm` of them, and no more (each split costs a partial write)."""
    return max(1, min(max_splits, -(-per_sm * sm_count // max(1, num_seqs * num_kv_heads))))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [S, Hq, D] (one token per sequence) -> [S, Hq, D]. k_cache/v_cache [blocks, block_size, Hkv, D] views;
    block_tables [>=S, max_blocks] int32, seq_lens [>=S] int32 (each >= 1)."""
    seqs, hq, head_dim = q.shape
    hkv = k_cache.shape[2]
    block_size = k_cache.shape[1]
    assert (
        hq % hkv == 0 and q.stride(2) == 1 and k_cache.stride(3) == 1 and k_cache.stride() == v_cache.stride()
    )
    assert block_tables.shape[0] >= seqs and seq_lens.shape[0] >= seqs and block_tables.dtype == torch.int32
    out = torch.empty_like(q) if out is None else out
    if seqs == 0:
        return out
    assert out.shape == q.shape and out.stride(2) == 1
    group = hq // hkv
    block_d = triton.next_power_of_2(head_dim)
    direct = num_splits == 1
    partials, lse = split_buffers(out, num_splits, block_d)
    _decode_partition_kernel[(seqs, hkv, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        partials,
        lse,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        partials.stride(0),
        partials.stride(1),
        0 if direct else partials.stride(2),
        lse.stride(0),
        lse.stride(1),
        scale * LOG2E,
        block_size,
        group,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=64,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 models get exact fp32 dots
        DIRECT=direct,
        num_warps=4,
    )
    if not direct:
        merge_splits(partials, lse, out, head_dim)
    return out


def split_buffers(out: torch.Tensor, splits: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where pass 1 writes for `out` [S, H, D]: with one split, out itself (and an unused log-sum-exp); else each
    split's fp32 output [S, H, splits, width] and log-sum-exp [S, H, splits]."""
    seqs, heads = out.shape[:2]
    if splits == 1:
        return out, torch.empty((seqs, heads, 1), dtype=torch.float32, device=out.device)
    partials = torch.empty((seqs, heads, splits, width), dtype=torch.float32, device=out.device)
    return partials, torch.empty((seqs, heads, splits), dtype=torch.float32, device=out.device)


def merge_splits(partials: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, dim: int) -> None:
    """Pass 2: out [S, H, dim] <- the splits merged by their log-sum-exp."""
    seqs, heads, splits, width = partials.shape
    _decode_reduce_kernel[(seqs, heads)](
        partials,
        lse,
        out,
        splits,
        partials.stride(0),
        partials.stride(1),
        partials.stride(2),
        lse.stride(0),
        lse.stride(1),
        out.stride(0),
        out.stride(1),
        HEAD_DIM=dim,
        BLOCK_D=width,
        BLOCK_P=triton.next_power_of_2(splits),
    )
