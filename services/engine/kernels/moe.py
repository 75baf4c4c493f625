"""MoE glue around the grouped GEMMs, reading only what is needed and never syncing with the host.

- gather_rows: out[i] = x[idx[i]] for i < count (count on the device: the rows of this rank's experts; the rest
  of out, the other ranks' pairs, is left unwritten and never read);
- combine: out[t] = sum over j of weight[t, j] * h[pos[t, j]], skipping pos -1 (another rank's expert), in fp32,
  one pass over the expert outputs instead of a scatter, a mask, a product and top-k additions;
- expert_gemv: for a few (row, expert) pairs (decode at small batch), out[p] = x[rows[p]] @ w[ids[p]]^T, each
  pair streaming only its expert's weights: no sort, no grouped GEMM and its per-group set-up.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _gather_rows_kernel(
    x_ptr, idx_ptr, count_ptr, out_ptr, stride_x, stride_out, hidden, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (cols < hidden) & (cols * 0 + row < tl.load(count_ptr))  # (broadcast: a block mask)
    src = tl.load(idx_ptr + row)
    tl.store(out_ptr + row * stride_out + cols, tl.load(x_ptr + src * stride_x + cols, mask=mask), mask=mask)


@triton.jit
def _combine_kernel(
    h_ptr, pos_ptr, w_ptr, out_ptr, stride_h, stride_out, hidden, K: tl.constexpr, BLOCK: tl.constexpr
):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(K):
        p = tl.load(pos_ptr + t * K + j)
        w = tl.load(w_ptr + t * K + j)
        row = tl.where(p >= 0, p, 0)
        h = tl.load(h_ptr + row * stride_h + cols, mask=mask & (cols * 0 + p >= 0), other=0.0)
        acc += w * h.to(tl.float32)
    tl.store(out_ptr + t * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def gather_rows(x: torch.Tensor, idx: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """x [N, H], idx [P], count [1] (device) -> [P, H] with rows >= count unwritten."""
    out = torch.empty((idx.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
    if idx.shape[0]:
        grid = (idx.shape[0], triton.cdiv(x.shape[1], BLOCK))
        _gather_rows_kernel[grid](x, idx, count, out, x.stride(0), out.stride(0), x.shape[1], BLOCK=BLOCK)
    return out


def combine(h: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """h [P, H] expert outputs, pos [T, K] rows of h (-1: none), weights [T, K] fp32 -> [T, H] in dtype."""
    t, k = pos.shape
    out = torch.empty((t, h.shape[1]), dtype=dtype, device=h.device)
    if t:
        grid = (t, triton.cdiv(h.shape[1], BLOCK))
        _combine_kernel[grid](
            h,
            pos.contiguous(),
            weights.contiguous(),
            out,
            h.stride(0),
            out.stride(0),
            h.shape[1],
            K=k,
            BLOCK=BLOCK,
        )
    return out


@triton.jit
def _expert_gemv_kernel(
    x_ptr,
    rows_ptr,
    ids_ptr,
    w_ptr,
    out_ptr,
    N,
    K,
    count,
    stride_x,
    stride_we,
    stride_wn,
    stride_o,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    p = tl.program_id(0)
    e = tl.load(ids_ptr + p)
    if (e < 0) | (e >= count):  # another rank's expert: its row of out is never read
        return
    row = tl.load(rows_ptr + p).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    w_rows = w_ptr + e.to(tl.int64) * stride_we + n[:, None] * stride_wn
    acc = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        w = tl.load(w_rows + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        v = tl.load(x_ptr + row * stride_x + k, mask=kmask, other=0.0).to(tl.float32)
        acc += tl.sum(w * v[None, :], 1)
    tl.store(out_ptr + p * stride_o + n, acc.to(out_ptr.dtype.element_ty), mask=nmask)


def expert_gemv(
    x: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, count: int
) -> torch.Tensor:
    """x [R, K], rows and ids [P] (local expert ids; outside [0, count) skipped, their rows left unwritten), w
    [E, N, K] -> [P, N]."""
    (pairs,) = ids.shape
    n, k = w.shape[1], w.shape[2]
    assert rows.shape == ids.shape and x.shape[1] == k and x.stride(1) == 1 and w.stride(2) == 1
    out = torch.empty((pairs, n), dtype=x.dtype, device=x.device)
    if pairs:
        _expert_gemv_kernel[(pairs, triton.cdiv(n, 16))](
            x,
            rows,
            ids,
            w,
            out,
            n,
            k,
            count,
            x.stride(0),
            w.stride(0),
            w.stride(1),
            out.stride(0),
            BLOCK_N=16,
            BLOCK_K=256,
            num_warps=4,
            num_stages=4,
        )
    return out
