"""Who this process is among the ranks of one worker, and the process groups it talks over.

Layout: world = tp x dp ranks. Attention is split over the tp ranks of a data-parallel replica (tensor
parallelism) and replicated across replicas, which each serve their own requests (data-parallel attention).
MoE experts are split over ep ranks: ep = 1 (every rank holds all experts) or ep = world. With dp = 1 all ranks
hold the same tokens and expert outputs are combined by an all-reduce; with dp > 1 tokens are dispatched to the
ranks that hold their experts and combined back (all-to-all).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    dp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        if min(self.tp, self.dp, self.ep) < 1:
            raise ValueError("tp, dp and ep must be at least 1")
        if self.ep not in (1, self.world):
            raise ValueError(f"ep must be 1 or the world size tp x dp = {self.world}, got {self.ep}")

    @property
    def world(self) -> int:
        return self.tp * self.dp


@dataclass(frozen=True)
class ParallelState:
    config: ParallelConfig
    rank: int  # in the world
    world_group: dist.ProcessGroup | None
    tp_group: dist.ProcessGroup | None  # this rank's tensor-parallel group (one data-parallel replica)
    # all ranks over the host (gloo): small agreements that must not wait for the GPU's queue
    host_group: dist.ProcessGroup | None = None
    # another library's expert dispatch (experts, x, weights, ids) -> sums (e.g. rocm.mori_dispatch.MoriDispatch)
    dispatcher: Callable[..., torch.Tensor] | None = None

    @property
    def tp(self) -> int:
        return self.config.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.config.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.config.tp

    @property
    def ep(self) -> int:
        return self.config.ep

    @property
    def ep_rank(self) -> int:
        return self.rank if self.config.ep > 1 else 0

    @property
    def ep_group(self) -> dist.ProcessGroup | None:
        return self.world_group

    @property
    def world(self) -> int:
        return self.config.world

    @property
    def distributed(self) -> bool:
        return self.config.world > 1

    @classmethod
    def single(cls) -> ParallelState:
        return cls(ParallelConfig(), 0, None, None)


def init_parallel(
    config: ParallelConfig, rank: int, init_method: str, backend: str | None = None
) -> ParallelState:
    """Join the worker's ranks (this process is `rank` of config.world) and build the groups."""
    if config.world == 1:
        return ParallelState.single()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=config.world)
    world = dist.group.WORLD
    host = world if dist.get_backend(world) == "gloo" else dist.new_group(backend="gloo")
    tp_group = None
    for replica in range(config.dp):  # every rank must take part in creating every group
        ranks = list(range(replica * config.tp, (replica + 1) * config.tp))
        group = dist.new_group(ranks) if config.tp > 1 else None
        if rank in ranks:
            tp_group = group
    return ParallelState(config, rank, world, tp_group, host_group=host)
