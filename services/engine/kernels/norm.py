"""RMSNorm, optionally fused with the residual add before it, one row per program.

Rounding follows the reference implementation step by step: the residual sum is rounded to the model dtype, the
normalised row is rounded to it before the weight is applied, and the product is rounded again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_x_head,
    n_heads,
    stride_res,
    stride_out,
    stride_res_out,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x_row = x_ptr + (row // n_heads) * stride_x + (row % n_heads) * stride_x_head
    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
        x = x.to(tl.float32)
    variance = tl.sum(x * x, axis=0) / n_cols
    y = (x * tl.rsqrt(variance + eps)).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (y * w).to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """rmsnorm(x) -> y, or with residual: (rmsnorm(x + residual), x + residual). x, residual: [rows, hidden];
    without residual x may also be [rows, heads, head_dim] (per-head norm, e.g. a strided view of a fused q/k/v
    projection), normalised over head_dim; y is contiguous."""
    assert x.stride(-1) == 1, "x must have contiguous rows"
    assert x.dim() == 2 or (x.dim() == 3 and residual is None), (
        "x must be [rows, hidden] or [rows, heads, dim]"
    )
    cols = x.shape[-1]
    assert weight.shape == (cols,) and weight.is_contiguous()
    heads, stride_head = (x.shape[1], x.stride(1)) if x.dim() == 3 else (1, 0)
    rows = x.shape[0] * heads
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else out
    if residual is not None:
        assert residual.shape == x.shape and residual.stride(1) == 1 and residual.dtype == x.dtype
    block = triton.next_power_of_2(cols)
    _rmsnorm_kernel[(rows,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        res_out,
        x.stride(0),
        stride_head,
        heads,
        residual.stride(0) if residual is not None else 0,
        cols,
        res_out.stride(0),
        cols,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=min(max(block // 256, 1), 16),
    )
    return out if residual is None else (out, res_out)
