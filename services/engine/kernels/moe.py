"""Routed experts on GPUs: each (token, expert) pair through its expert's two projections, then a weighted sum per
token, in four kernels and without reading anything back to the host (so CUDA graphs capture them).

Pairs are numbered p = token * top_k + slot. Both projections write pair p's row of their output (pairs of other
ranks' experts are skipped and their rows never written), and `combine` sums each token's rows:
    h[p]   = silu(x[token] @ gate[e]^T) * (x[token] @ up[e]^T)      w13[e] = [gate; up], [2 * inter, hidden]
    y[p]   = h[p] @ w2[e]^T                                            w2[e] [hidden, inter]
    out[t] = sum over slots j of weight[t, j] * y[t * top_k + j]       (fp32, this rank's experts only)

- `expert_order`: the pairs sorted by expert (one program per expert finds and places its own pairs), and where
  each expert's pairs end;
- `expert_gemm`, once per projection: each program takes a tile of up to BLOCK_M consecutive sorted pairs of one
  expert (gathering their input rows) times a block of the expert's weight, so each expert's weights are read
  once per tile of its pairs. Programs find their tile from the per-expert ends themselves; the grid is sized for
  the worst case (every expert's last tile partly filled) and surplus programs return at once. silu(gate) * up is
  the first projection's epilogue, rounded as the reference rounds it (gate and up to the model dtype, silu(gate)
  again before the product). At one token the tiles are mostly empty rows, yet this streams the experts' weights
  faster than a GEMV per pair did;
- `combine`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul(gate, up, ty: tl.constexpr):
    g = gate.to(ty).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(ty).to(tl.float32)
    return (act * up.to(ty).to(tl.float32)).to(ty)


@triton.jit
def _order_kernel(ids_ptr, order_ptr, ends_ptr, pairs, first, count, BLOCK_P: tl.constexpr):
    """Program e: the pairs of local expert e in pair order, placed after those of experts < e (a stable sort
    by expert; the other ranks' pairs are not placed)."""
    e = tl.program_id(0)
    start = 0
    for p0 in range(0, pairs, BLOCK_P):  # pass 1: how many pairs sort before this expert's
        p = p0 + tl.arange(0, BLOCK_P)
        local = tl.load(ids_ptr + p, mask=p < pairs, other=0) - first
        local = tl.where((local >= 0) & (local < count), local, count)
        start += tl.sum(((local < e) & (p < pairs)).to(tl.int32), 0)
    slot = start
    for p0 in range(0, pairs, BLOCK_P):  # pass 2: place them, in pair order
        p = p0 + tl.arange(0, BLOCK_P)
        local = tl.load(ids_ptr + p, mask=p < pairs, other=0) - first
        local = tl.where((local >= 0) & (local < count), local, count)
        mine = (local == e) & (p < pairs)
        tl.store(order_ptr + slot + tl.cumsum(mine.to(tl.int32), 0) - 1, p.to(tl.int64), mask=mine)
        slot += tl.sum(mine.to(tl.int32), 0)
    tl.store(ends_ptr + e, slot)


def expert_order(ids: torch.Tensor, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, top_k] global expert ids -> (order [P]: the pair numbers of this rank's experts sorted by expert,
    each expert's in pair order, then unspecified; ends [count] int32: where each expert's pairs end in order)."""
    pairs = ids.numel()
    order = torch.empty(pairs, dtype=torch.int64, device=ids.device)
    ends = torch.empty(count, dtype=torch.int32, device=ids.device)
    if pairs == 0:
        return order, ends.zero_()
    block_p = min(2048, max(16, triton.next_power_of_2(pairs)))
    warps = 4 if block_p <= 1024 else 8
    _order_kernel[(count,)](ids, order, ends, pairs, first, count, BLOCK_P=block_p, num_warps=warps)
    return order, ends


@triton.jit
def _expert_gemm_kernel(
    a_ptr,
    order_ptr,
    ends_ptr,
    w_ptr,
    out_ptr,
    N,
    K,
    count,
    stride_a,
    stride_we,
    stride_wn,
    stride_o,
    TOP_K: tl.constexpr,
    GATHER: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # the column block varies fastest, so the programs running at once share few pair tiles (their rows are read
    # once) and one or two experts (their weights too); row tiles first re-read every pair row per column block
    n_tiles = tl.cdiv(N, BLOCK_N)
    tile, n_block = tl.program_id(0) // n_tiles, tl.program_id(0) % n_tiles
    experts = tl.arange(0, BLOCK_E)
    ends = tl.load(ends_ptr + experts, mask=experts < count, other=0)
    starts = tl.load(ends_ptr + experts - 1, mask=(experts > 0) & (experts < count), other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    tile_ends = tl.cumsum(tiles, 0)
    e = tl.sum((tile_ends <= tile).to(tl.int32), 0)
    if e >= count:  # surplus program: the grid covers the worst case
        return
    mine = experts == e
    row0 = tl.sum(tl.where(mine, starts + (tile - tile_ends + tiles) * BLOCK_M, 0), 0)
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < tl.sum(tl.where(mine, ends, 0), 0)
    pair = tl.load(order_ptr + rows, mask=rmask, other=0)
    # the first projection reads the pair's token row (x); the second reads the pair's own row (h)
    a_rows = (pair // TOP_K if GATHER else pair).to(tl.int64)
    n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    w_cols = w_ptr + e.to(tl.int64) * stride_we + n[None, :] * stride_wn  # [1, BLOCK_N]: w[e]^T's columns
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        a = tl.load(
            a_ptr + a_rows[:, None] * stride_a + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0
        )
        wmask = kmask[:, None] & nmask[None, :]
        acc = tl.dot(a, tl.load(w_cols + k[:, None], mask=wmask, other=0.0), acc, input_precision=PRECISION)
        if SILU:
            acc_up = tl.dot(
                a,
                tl.load(w_cols + N * stride_wn + k[:, None], mask=wmask, other=0.0),
                acc_up,
                input_precision=PRECISION,
            )
    ty = out_ptr.dtype.element_ty
    y = _silu_mul(acc, acc_up, ty) if SILU else acc.to(ty)
    out = out_ptr + pair.to(tl.int64)[:, None] * stride_o + n[None, :]
    tl.store(out, y, mask=rmask[:, None] & nmask[None, :])


def gemm_config(pairs: int, experts: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) by pairs per expert, measured best on an H200 for Qwen3-30B-A3B's
    and DeepSeek-V2-Lite's experts: tiles of 16 pairs while the weights are the traffic (decode), larger ones as
    the matmul takes over (prefill)."""
    per_expert = pairs / max(experts, 1)
    if per_expert <= 8:
        return 16, 128, 128, 4, 3
    if per_expert <= 32:
        return 32, 128, 128, 4, 3
    return 128, 128, 64, 8, 4 if per_expert <= 128 else 3


def expert_gemm(
    a: torch.Tensor,
    order: torch.Tensor,
    ends: torch.Tensor,
    w: torch.Tensor,
    top_k: int,
    silu: bool,
    config: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """One projection of the sorted pairs (`expert_order`): a [P / top_k, K] (token rows; top_k 1: pair rows),
    w [count, N, K] -> [P, N] (silu: [P, N / 2]) at pair rows; rows of pairs of no local expert unwritten."""
    pairs, count = order.shape[0], w.shape[0]
    n, k = w.shape[1] // (2 if silu else 1), w.shape[2]
    assert a.shape == (pairs // top_k, k) and a.stride(1) == 1 and w.stride(2) == 1 and ends.shape == (count,)
    out = torch.empty((pairs, n), dtype=a.dtype, device=a.device)
    block_m, block_n, block_k, warps, stages = config or gemm_config(pairs, count)
    if a.element_size() > 2:  # fp32 tiles: half as deep, so the pipeline's buffers fit in shared memory
        block_k, stages = block_k // 2, min(stages, 3)
    if pairs:
        # tiles: at most one per BLOCK_M pairs plus one partial per expert, and never more than the pairs
        grid = (min(triton.cdiv(pairs, block_m) + count, pairs) * triton.cdiv(n, block_n),)
        _expert_gemm_kernel[grid](
            a,
            order,
            ends,
            w,
            out,
            n,
            k,
            count,
            a.stride(0),
            w.stride(0),
            w.stride(1),
            out.stride(0),
            TOP_K=top_k,
            GATHER=top_k > 1,
            SILU=silu,
            BLOCK_E=triton.next_power_of_2(count),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            PRECISION="ieee" if a.dtype == torch.float32 else "tf32",  # fp32 models get exact fp32 dots
            num_warps=warps,
            num_stages=stages,
        )
    return out


@triton.jit
def _combine_kernel(
    y_ptr,
    ids_ptr,
    w_ptr,
    out_ptr,
    first,
    count,
    stride_y,
    stride_out,
    hidden,
    TOP_K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        p = t * TOP_K + j
        e = cols * 0 + tl.load(ids_ptr + p) - first  # (broadcast: a block mask)
        y = tl.load(y_ptr + p.to(tl.int64) * stride_y + cols, mask=mask & (e >= 0) & (e < count), other=0.0)
        acc += tl.load(w_ptr + p) * y.to(tl.float32)
    tl.store(out_ptr + t * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def combine(
    y: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, first: int, count: int, dtype: torch.dtype
) -> torch.Tensor:
    """y [P, H] pair outputs, ids [T, top_k] global expert ids, weights [T, top_k] -> [T, H] in dtype: each
    token's weighted sum over its pairs of this rank's experts (in fp32; the others' rows are not read)."""
    t, k = ids.shape
    out = torch.empty((t, y.shape[1]), dtype=dtype, device=y.device)
    if t:
        block = min(1024, triton.next_power_of_2(y.shape[1]))
        _combine_kernel[(t, triton.cdiv(y.shape[1], block))](
            y,
            ids.contiguous(),
            weights.float().contiguous(),
            out,
            first,
            count,
            y.stride(0),
            out.stride(0),
            y.shape[1],
            TOP_K=k,
            BLOCK=block,
        )
    return out
