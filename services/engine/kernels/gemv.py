"""y = x W^T for a handful of rows (decode at small batch), streaming W once at close to full bandwidth.

Each program owns BLOCK_N output features and walks K in BLOCK_K steps, for all M rows of x at once, so every
weight tile is read once whatever M is. Accumulation in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 4


def config_for(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, warps, stages) measured best on an H200 for Llama-8B's shapes at one row."""
    if n * k >= 100_000_000:  # the MLP's gate/up and the LM head
        return (16 if n > 100_000 else 8), 256, 4, 4
    return 8, 1024, 8, 6


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    ks = tl.arange(0, BLOCK_K)
    acc0 = tl.zeros([BLOCK_N], tl.float32)
    acc1 = tl.zeros([BLOCK_N], tl.float32)
    acc2 = tl.zeros([BLOCK_N], tl.float32)
    acc3 = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        kmask = k < K
        w = tl.load(
            w_ptr + rows[:, None] * stride_wn + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0
        ).to(tl.float32)
        acc0 += tl.sum(w * tl.load(x_ptr + k, mask=kmask, other=0.0).to(tl.float32)[None, :], 1)
        if M > 1:
            acc1 += tl.sum(
                w * tl.load(x_ptr + stride_xm + k, mask=kmask, other=0.0).to(tl.float32)[None, :], 1
            )
        if M > 2:
            acc2 += tl.sum(
                w * tl.load(x_ptr + 2 * stride_xm + k, mask=kmask, other=0.0).to(tl.float32)[None, :], 1
            )
        if M > 3:
            acc3 += tl.sum(
                w * tl.load(x_ptr + 3 * stride_xm + k, mask=kmask, other=0.0).to(tl.float32)[None, :], 1
            )
    bias = tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + rows, (acc0 + bias).to(ty), mask=rmask)
    if M > 1:
        tl.store(out_ptr + stride_om + rows, (acc1 + bias).to(ty), mask=rmask)
    if M > 2:
        tl.store(out_ptr + 2 * stride_om + rows, (acc2 + bias).to(ty), mask=rmask)
    if M > 3:
        tl.store(out_ptr + 3 * stride_om + rows, (acc3 + bias).to(ty), mask=rmask)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x [M <= 4, K] @ weight[N, K]^T (+ bias) -> [M, N] in out_dtype (default x's). config: (BLOCK_N, BLOCK_K,
    warps, stages)."""
    m, k = x.shape
    n = weight.shape[0]
    block_n, block_k, num_warps, num_stages = config or config_for(n, k)
    assert 1 <= m <= MAX_ROWS and weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1
    out = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x,
        weight,
        bias if bias is not None else weight,
        out,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        M=m,
        HAS_BIAS=bias is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
