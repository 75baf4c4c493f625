"""Experts kernel `aiter`: aiter's fused MoE in place of pdmesh's expert kernels.

aiter takes the stacked weights as pdmesh keeps them (w1 [local experts, 2 x inter, hidden], gate rows then up;
w2 [local experts, hidden, inter]), shuffled once into its tile layout, global expert ids with a mask of the local
experts, and applies the routing weights itself."""

from __future__ import annotations

import torch

from services.engine.rocm import require


class AiterExperts:
    def __init__(self, experts) -> None:  # type: ignore[no-untyped-def]
        aiter = require("aiter", "the aiter MoE kernels")
        from aiter.fused_moe import fused_moe
        from aiter.ops.shuffle import shuffle_weight

        self.fused_moe = fused_moe
        # NOTE: shuffled in place: from here on only aiter reads these weights
        experts.w13.data = shuffle_weight(experts.w13.data, layout=(16, 16))
        experts.w2.data = shuffle_weight(experts.w2.data, layout=(16, 16))
        self.experts = experts
        mask = torch.zeros(experts.num_experts, dtype=torch.int32, device=experts.w13.device)
        mask[experts.first : experts.first + experts.count] = 1
        self.mask = mask
        self.silu = aiter.ActivationType.Silu

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        e = self.experts
        return self.fused_moe(
            x, e.w13, e.w2, weights.float(), ids.to(torch.int32), expert_mask=self.mask, activation=self.silu
        )
