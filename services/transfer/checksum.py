"""An end-to-end KV checksum (debug option): both sides hash the same blocks, in prompt order, on their device.

Integer arithmetic only, so CPU and GPU agree bit for bit. It catches a transfer that skipped, misplaced or
corrupted blocks, which otherwise shows up only as subtly wrong tokens.
"""

from __future__ import annotations

import torch

BLOCKS_PER_PASS = 64
_MIX = 0x9E3779B97F4A7C15 - (1 << 64)  # odd 64-bit constant, as a signed int64


def kv_checksum(kv: torch.Tensor, block_ids: list[int]) -> int:
    """Hash of kv[block_ids] (whole blocks, all layers), sensitive to every word and to block order."""
    total = torch.zeros((), dtype=torch.int64, device=kv.device)
    if not block_ids:
        return 0
    words_per_block = kv[0].numel() * kv.element_size() // 4
    weights = torch.arange(1, words_per_block + 1, dtype=torch.int64, device=kv.device)
    for start in range(0, len(block_ids), BLOCKS_PER_PASS):
        ids = torch.tensor(block_ids[start : start + BLOCKS_PER_PASS], device=kv.device)
        words = kv[ids].contiguous().view(torch.int32).view(len(ids), words_per_block).to(torch.int64)
        per_block = (words * weights).sum(dim=1)  # int64 arithmetic wraps: a hash, not a sum
        order = torch.arange(start + 1, start + len(ids) + 1, dtype=torch.int64, device=kv.device)
        total = total + (per_block * _MIX + order).mul(order * _MIX).sum()
    return int(total.item()) & ((1 << 64) - 1)
