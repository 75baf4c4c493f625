"""Expert-parallel MoE: each rank holds num_experts / ep experts.

- Tokens replicated on every rank (dp = 1): each rank runs its own experts over all tokens; an all-reduce sums.
- Data-parallel attention (dp > 1, each rank its own tokens), two ways to reach the experts:
  - exact all-to-all (`dispatch_rows` None): every (token, expert) pair goes to the rank holding the expert and
    comes back to the token's rank, where the pairs are weighted and summed in ascending expert order, as on one
    rank. The pair counts are read on the host, so it cannot run inside a CUDA graph.
  - fixed shape (`dispatch_rows` R, the most tokens any rank has in this micro-batch): every rank pads its tokens
    to R rows and all-gathers them with their routing; each rank sums its own experts' weighted outputs for all
    ep x R rows and a reduce-scatter returns each rank its rows' sums. Nothing is read back to the host, so it runs
    inside CUDA graphs and never stalls the launch queue under two-batch overlap. It moves every token to every
    rank: the same bytes as the all-to-all when each token's top-k experts span all ranks (ep = 2 with top-8 of
    128: all but 0.4% of tokens), more for larger ep.
Ranks with no tokens still take part in every collective, so uneven batches never hang.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist

from services.engine.parallel.comm import Stage, all_reduce, all_to_all, gather_into, reduce_scatter
from services.engine.parallel.state import ParallelState


class LocalExperts(Protocol):
    first: int  # global id of this rank's first expert
    count: int

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor: ...
    def mlp(self, x: torch.Tensor, rows: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor: ...


def expert_stages(
    experts: LocalExperts,
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    parallel: ParallelState,
    dispatch_rows: int | None = None,
) -> Stage[torch.Tensor]:
    """The routed experts' weighted sum for each token of x, whichever rank holds the experts."""
    if parallel.ep == 1:
        return experts(x, weights, ids)
    if parallel.config.dp == 1:
        return (yield from all_reduce(experts(x, weights, ids), parallel.ep_group))
    if parallel.dispatcher is not None:
        return parallel.dispatcher(experts, x, weights, ids)
    if dispatch_rows is None:
        return (yield from dispatch_combine(experts, x, weights, ids, parallel.ep, parallel.ep_group))
    return (yield from gather_scatter(experts, x, weights, ids, dispatch_rows, parallel.ep_group))


def dispatch_combine(
    experts: LocalExperts,
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    ep: int,
    group: dist.ProcessGroup | None,
) -> Stage[torch.Tensor]:
    k = ids.shape[1]
    flat_ids = ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # pairs by expert, hence grouped by destination rank
    send_counts = torch.bincount(flat_ids // experts.count, minlength=ep)
    recv_counts = yield from all_to_all(send_counts, [1] * ep, [1] * ep, group)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    pair_token = order // k
    recv_x = yield from all_to_all(x[pair_token], send, recv, group)
    recv_ids = yield from all_to_all(flat_ids[order], send, recv, group)
    rows = torch.arange(recv_x.shape[0], device=x.device)
    out = experts.mlp(recv_x, rows, recv_ids - experts.first)
    back = yield from all_to_all(out, recv, send, group)
    # back[j] is pair order[j]; put the pairs back as [token, k] sorted by expert and add them in that order
    slot = ids.sort(dim=1).indices
    pair_out = torch.empty_like(back).index_copy_(0, order, back).view(*ids.shape, x.shape[1])
    pair_out = pair_out.gather(1, slot[..., None].expand_as(pair_out))
    y = (pair_out * weights.gather(1, slot)[..., None]).to(x.dtype)
    result = torch.zeros_like(x)
    for j in range(k):
        result += y[:, j]
    return result


def gather_scatter(
    experts: LocalExperts,
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    rows: int,
    group: dist.ProcessGroup | None,
) -> Stage[torch.Tensor]:
    t, k = ids.shape
    assert t <= rows, f"{t} tokens exceed the agreed dispatch size {rows}"
    ep = dist.get_world_size(group)
    x_pad = x.new_zeros(rows, x.shape[1])
    x_pad[:t] = x
    # routing travels as one int32 tensor: k expert ids (-1: padding, no expert) then k weights' bits
    routing = torch.full((rows, 2 * k), -1, dtype=torch.int32, device=x.device)
    routing[:t, :k] = ids
    routing[:t, k:] = weights.float().view(torch.int32)
    all_x = x.new_empty(ep * rows, x.shape[1])
    all_routing = routing.new_empty(ep * rows, 2 * k)
    works = [
        gather_into(all_x, x_pad, group=group, async_op=True),
        gather_into(all_routing, routing, group=group, async_op=True),
    ]
    yield works[-1]
    for work in works:
        work.wait()
    all_ids = all_routing[:, :k].long()
    all_weights = all_routing[:, k:].contiguous().view(torch.float32).to(weights.dtype)
    partial = experts(all_x, all_weights, all_ids)
    mine = x.new_empty(rows, x.shape[1])
    work = reduce_scatter(mine, partial, group=group, async_op=True)
    yield work
    work.wait()
    return mine[:t]
