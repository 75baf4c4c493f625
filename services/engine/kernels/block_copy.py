"""Copy whole KV blocks between buffers: the staging gather (pool -> contiguous slot) and scatter (back)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 4096  # elements per program


@triton.jit
def _copy_blocks_kernel(
    src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr, block_numel, stride_src, stride_dst, BLOCK: tl.constexpr
):
    i, chunk = tl.program_id(0), tl.program_id(1)
    s = tl.load(src_ids_ptr + i).to(tl.int64)
    d = tl.load(dst_ids_ptr + i).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < block_numel
    tl.store(dst_ptr + d * stride_dst + offs, tl.load(src_ptr + s * stride_src + offs, mask=mask), mask=mask)


def copy_blocks(src: torch.Tensor, src_ids: torch.Tensor, dst: torch.Tensor, dst_ids: torch.Tensor) -> None:
    """dst[dst_ids[i]] = src[src_ids[i]] for whole blocks (dim 0); each block contiguous in both buffers."""
    assert src.dtype == dst.dtype and src.shape[1:] == dst.shape[1:]
    assert src[0].is_contiguous() and dst[0].is_contiguous(), "blocks must be contiguous"
    assert src_ids.shape == dst_ids.shape and src_ids.dim() == 1
    n = src_ids.numel()
    if n == 0:
        return
    numel = src[0].numel()
    _copy_blocks_kernel[(n, triton.cdiv(numel, CHUNK))](
        src, dst, src_ids, dst_ids, numel, src.stride(0), dst.stride(0), BLOCK=CHUNK
    )


def gather_blocks(src: torch.Tensor, ids: torch.Tensor, dst: torch.Tensor) -> None:
    """dst[i] = src[ids[i]]: blocks scattered in the pool into one contiguous run."""
    copy_blocks(src, ids, dst, torch.arange(ids.numel(), device=ids.device, dtype=ids.dtype))


def scatter_blocks(src: torch.Tensor, dst: torch.Tensor, ids: torch.Tensor) -> None:
    """dst[ids[i]] = src[i]: a contiguous run back into blocks of the pool."""
    copy_blocks(src, torch.arange(ids.numel(), device=ids.device, dtype=ids.dtype), dst, ids)
