"""Expert dispatch `mori`: mori's dispatch/combine kernels move each token to the ranks holding its experts and
back, in place of `torch.distributed` collectives (data-parallel attention with expert parallelism).

mori keeps expert ids global and sums the rows the ranks send back without weighting them, so the experts apply
the routing weights on the receiving rank (as `Experts` does)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from services.engine.rocm import require

GROUP = "pdmesh"


class MoriDispatch:
    def __init__(
        self,
        group: dist.ProcessGroup,
        hidden: int,
        experts_per_rank: int,
        top_k: int,
        max_tokens: int,
        dtype: torch.dtype,
    ) -> None:
        mori = require("mori", "the mori expert dispatch")
        torch._C._distributed_c10d._register_process_group(GROUP, group)
        mori.shmem.shmem_torch_process_group_init(GROUP)
        config = mori.ops.EpDispatchCombineConfig(
            data_type=dtype,
            rank=dist.get_rank(group),
            world_size=dist.get_world_size(group),
            hidden_dim=hidden,
            scale_dim=0,
            scale_type_size=1,
            max_token_type_size=dtype.itemsize,
            max_num_inp_token_per_rank=max_tokens,
            num_experts_per_rank=experts_per_rank,
            num_experts_per_token=top_k,
        )
        self.op = mori.ops.EpDispatchCombineOp(config)

    def __call__(self, experts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
        """The routed experts' weighted sum for each token of x (rows the op did not fill are never sent back)."""
        ids32 = ids.to(torch.int32)
        recv, recv_weights, _, recv_ids, _ = self.op.dispatch(x, weights.float(), None, ids32)
        partial = experts(recv, recv_weights, recv_ids.long())
        combined, _ = self.op.combine(partial, None, ids32)
        return combined[: x.shape[0]]
