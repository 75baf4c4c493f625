"""Collectives as stages: each launches an asynchronous collective, yields its handle, then waits for it.

A model's forward pass is a generator of such stages. Run alone (`run`), every stage is waited for at once. Under
two-batch overlap the executor switches to the other micro-batch at each yield, so one micro-batch computes
while the other's collective is in flight. NOTE: collectives never run on the compute stream: NCCL (and RCCL)
use their own stream, and `wait()` only makes the compute stream wait for them.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
# the names these collectives have in the running torch release (older ones lack the *_single forms)
gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
Stage = Generator[dist.Work | None, None, T]


def run(stages: Stage[T]) -> T:
    """Drive a generator of stages to its end, waiting for each collective as it comes."""
    try:
        while True:
            next(stages)
    except StopIteration as done:
        return done.value


def all_reduce(t: torch.Tensor, group: dist.ProcessGroup | None) -> Stage[torch.Tensor]:
    """Sum over the group (in place). A group of one (None) is free."""
    if group is None:
        return t
    work = dist.all_reduce(t, group=group, async_op=True)
    yield work
    work.wait()
    return t


def all_gather(t: torch.Tensor, group: dist.ProcessGroup | None, dim: int = -1) -> Stage[torch.Tensor]:
    """Concatenate every rank's tensor (same shape on all) along dim."""
    if group is None:
        return t
    size = dist.get_world_size(group)
    out = torch.empty((size * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    work = gather_into(out, t.contiguous(), group=group, async_op=True)
    yield work
    work.wait()
    return torch.cat(out.chunk(size, dim=0), dim=dim)


def all_to_all(
    t: torch.Tensor, send_counts: list[int], recv_counts: list[int], group: dist.ProcessGroup | None
) -> Stage[torch.Tensor]:
    """Rows [sum(send_counts[:r]), ...) go to rank r; returns the rows every rank sent here, by rank."""
    out = t.new_empty((sum(recv_counts), *t.shape[1:]))
    work = dist.all_to_all_single(out, t.contiguous(), recv_counts, send_counts, group=group, async_op=True)
    yield work
    work.wait()
    return out
