"""Tensor-parallel layers: weights split over the ranks of a tensor-parallel group.

- ColumnParallelLinear: output features split; every packed piece (q/k/v, gate/up) is split on its own, so
  rank r's [q_r | k_r | v_r] is one local matmul. No communication.
- RowParallelLinear: input features split; the partial products are summed by an all-reduce (a stage).
- VocabParallelEmbedding / ParallelLMHead: vocabulary rows split; lookups summed, logits gathered.
Each parameter's shards say which slice of the checkpoint tensor this rank keeps, so loading reads only that.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from services.engine.models.layers import Shard, _param, narrow
from services.engine.parallel.comm import Stage, all_gather, all_reduce


def _split(size: int, parts: int, what: str) -> int:
    if size % parts:
        raise ValueError(f"{what} ({size}) is not divisible by the tensor-parallel size {parts}")
    return size // parts


class ColumnParallelLinear(nn.Module):
    def __init__(
        self, in_features: int, out_shards: dict[str, int] | int, bias: bool, rank: int, size: int
    ) -> None:
        super().__init__()
        pieces = out_shards if isinstance(out_shards, dict) else {None: out_shards}
        shards: dict[Hashable, Shard] = {}
        offset = 0
        for name, full in pieces.items():
            local = _split(full, size, f"output features of '{name or 'the projection'}'")
            shards[name] = Shard(dest=narrow(0, offset, local), source=narrow(0, rank * local, local))
            offset += local
        self.weight = _param(offset, in_features, shards=shards)
        self.bias = _param(offset, shards=dict(shards)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        rank: int,
        size: int,
        group: dist.ProcessGroup | None,
    ) -> None:
        super().__init__()
        local = _split(in_features, size, "input features")
        self.weight = _param(out_features, local, shards={None: Shard(source=narrow(1, rank * local, local))})
        self.bias = _param(out_features) if bias else None  # added once, after the sum
        self.group = group

    def stages(self, x: torch.Tensor) -> Stage[torch.Tensor]:
        y = yield from all_reduce(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab: int, dim: int, rank: int, size: int, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.local = _split(vocab, size, "the vocabulary")
        self.start = rank * self.local
        self.weight = _param(self.local, dim, shards={None: Shard(source=narrow(0, self.start, self.local))})
        self.group = group

    def stages(self, ids: torch.Tensor) -> Stage[torch.Tensor]:
        local = ids - self.start
        mine = (local >= 0) & (local < self.local)
        x = F.embedding(local.clamp(0, self.local - 1), self.weight) * mine.unsqueeze(-1).to(
            self.weight.dtype
        )
        return (yield from all_reduce(x, self.group))


class ParallelLMHead(nn.Module):
    def __init__(self, dim: int, vocab: int, rank: int, size: int, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        local = _split(vocab, size, "the vocabulary")
        self.weight = _param(local, dim, shards={None: Shard(source=narrow(0, rank * local, local))})
        self.group = group

    def stages(self, hidden: torch.Tensor) -> Stage[torch.Tensor]:
        return (yield from all_gather(F.linear(hidden, self.weight), self.group, dim=-1))
