"""Write each token's latent (latent attention) at its slot of the paged cache; slot -1 is skipped. Reads nothing
from the host, so it runs inside CUDA graphs (whose padding rows have slot -1)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kernel(
    src_ptr, dst_ptr, slots_ptr, stride_s, stride_b, stride_t, block_size, dim, BLOCK_D: tl.constexpr
):
    row = tl.program_id(0)
    slot = tl.load(slots_ptr + row)
    if slot < 0:
        return
    d = tl.arange(0, BLOCK_D)
    mask = d < dim
    value = tl.load(src_ptr + row * stride_s + d, mask=mask)
    dst = dst_ptr + (slot // block_size) * stride_b + (slot % block_size) * stride_t + d
    tl.store(dst, value.to(dst_ptr.dtype.element_ty), mask=mask)


def store_latent(latent: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
    """cache [blocks, block_size, 1, D] (a strided view) <- latent [T, D] at slots [T] (int64, -1: skip)."""
    rows, dim = latent.shape
    assert cache.shape[2] == 1 and cache.shape[3] == dim and cache.stride(3) == 1 and latent.stride(1) == 1
    assert slots.shape == (rows,)
    if rows == 0:
        return
    _store_kernel[(rows,)](
        latent,
        cache,
        slots,
        latent.stride(0),
        cache.stride(0),
        cache.stride(1),
        cache.shape[1],
        dim,
        BLOCK_D=triton.next_power_of_2(dim),
    )
