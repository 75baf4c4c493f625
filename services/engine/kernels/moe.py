"""MoE glue around the grouped GEMMs, reading only what is needed and never syncing with the host.

- gather_rows: out[i] = x[idx[i]] for i < count (count on the device: the rows of this rank's experts; the rest
  of out, the other ranks' pairs, is left unwritten and never read);
- combine: out[t] = sum over j of weight[t, j] * h[pos[t, j]], skipping pos -1 (another rank's expert), in fp32,
  one pass over the expert outputs instead of a scatter, a mask, a product and top-k additions.
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
