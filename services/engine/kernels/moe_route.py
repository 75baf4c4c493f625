"""Greedy MoE routing in one kernel: scores (softmax or sigmoid over the router logits, in fp32), the top k, their
renormalisation and scaling, one token per program.

Replaces some eight PyTorch calls per layer (cast, softmax, topk, sum, divide, scale, cast back). Ties pick the
lower expert id. With `round_to` the weights are rounded to that dtype (Qwen3-MoE's reference rounds them to the
model dtype) and returned as fp32 all the same, which is what the experts' combine reads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route_kernel(
    logits_ptr,
    weights_ptr,
    ids_ptr,
    stride_l,
    num_experts,
    scale,
    eps,
    TOP_K: tl.constexpr,
    SIGMOID: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    ROUND_F16: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    t = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    valid = e < num_experts
    x = tl.load(logits_ptr + t * stride_l + e, mask=valid, other=0.0).to(tl.float32)
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-x))
    else:
        x = tl.where(valid, x, float("-inf"))
        p = tl.exp(x - tl.max(x, 0))
        scores = p / tl.sum(p, 0)
    left = tl.where(valid, scores, -1.0)  # scores are >= 0: -1 marks taken or absent experts
    slot = tl.arange(0, BLOCK_K)
    chosen = tl.zeros([BLOCK_K], tl.float32)
    chosen_ids = tl.zeros([BLOCK_K], tl.int64)
    for j in tl.static_range(TOP_K):
        best = tl.max(left, 0)
        pick = tl.min(tl.where(left == best, e, BLOCK_E), 0)
        chosen = tl.where(slot == j, best, chosen)
        chosen_ids = tl.where(slot == j, pick.to(tl.int64), chosen_ids)
        left = tl.where(e == pick, -1.0, left)
    if RENORMALIZE:
        chosen = chosen / (tl.sum(chosen, 0) + eps)
    chosen = chosen * scale
    if ROUND_BF16:
        chosen = chosen.to(tl.bfloat16).to(tl.float32)
    if ROUND_F16:
        chosen = chosen.to(tl.float16).to(tl.float32)
    tl.store(weights_ptr + t * TOP_K + slot, chosen, mask=slot < TOP_K)
    tl.store(ids_ptr + t * TOP_K + slot, chosen_ids, mask=slot < TOP_K)


def route_topk(
    logits: torch.Tensor,
    top_k: int,
    sigmoid: bool,
    renormalize: bool,
    scale: float,
    round_to: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, top_k] fp32, ids [T, top_k] int64), the top k by score, in descending score."""
    t, experts = logits.shape
    assert logits.stride(1) == 1 and 0 < top_k <= experts
    assert round_to in (None, torch.float32, torch.bfloat16, torch.float16)
    weights = torch.empty((t, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((t, top_k), dtype=torch.int64, device=logits.device)
    if t:
        _route_kernel[(t,)](
            logits,
            weights,
            ids,
            logits.stride(0),
            experts,
            scale,
            1e-20 if sigmoid else 0.0,
            TOP_K=top_k,
            SIGMOID=sigmoid,
            RENORMALIZE=renormalize,
            ROUND_BF16=round_to == torch.bfloat16,
            ROUND_F16=round_to == torch.float16,
            BLOCK_K=triton.next_power_of_2(top_k),
            BLOCK_E=triton.next_power_of_2(experts),
        )
    return weights, ids
