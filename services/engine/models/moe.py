"""Mixture of experts: routing, stacked experts, and the Qwen3-MoE / Mixtral models.

Experts are stacked 3-D parameters (one matmul weight per expert along dim 0):
    w13[e]  [2 * inter, hidden]   gate rows, then up rows
    w2[e]   [hidden, inter]
A rank holds experts [first, first + count) (expert parallelism); the checkpoint's per-expert tensors land in
their slices, other ranks' experts are skipped at load.
"""

from __future__ import annotations

import re
from collections.abc import Hashable

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.model_config import ModelConfig, MoEConfig
from services.engine.models.dense import MLP, DenseForCausalLM
from services.engine.models.layers import Linear, Shard, _param, silu_and_mul

_EXPERT = re.compile(r"^(?P<prefix>.*\.)(?:mlp|block_sparse_moe)\.experts\.(?P<e>\d+)\.(?P<w>\w+)\.weight$")
# checkpoint projection name -> (stacked parameter, shard)
_EXPERT_WEIGHTS = {
    "gate_proj": ("w13", "gate"),
    "up_proj": ("w13", "up"),
    "down_proj": ("w2", "down"),
    "w1": ("w13", "gate"),
    "w3": ("w13", "up"),
    "w2": ("w2", "down"),
}


def expert_target(key: str) -> tuple[str, Hashable] | None:
    """A per-expert checkpoint tensor -> (stacked parameter, (shard, expert)); None if `key` is no expert's."""
    m = _EXPERT.match(key)
    if m is None:
        return None
    stacked, shard = _EXPERT_WEIGHTS[m["w"]]
    return f"{m['prefix']}mlp.experts.{stacked}", (shard, int(m["e"]))


def expert_name(name: str, shard: Hashable) -> str | None:
    if not isinstance(shard, tuple):
        return None
    kind, e = shard
    return re.sub(r"experts\.w(13|2)$", f"experts.{e}.{kind}_proj.weight", name)


class Experts(nn.Module):
    def __init__(
        self, num_experts: int, hidden: int, inter: int, first: int = 0, count: int | None = None
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.first = first
        self.count = num_experts - first if count is None else count
        self.inter = inter
        local = range(first, first + self.count)
        w13: dict[Hashable, Shard] = {}
        w2: dict[Hashable, Shard] = {}
        for e in local:
            i = e - first
            w13[("gate", e)] = Shard(dest=lambda t, i=i: t[i, :inter])
            w13[("up", e)] = Shard(dest=lambda t, i=i: t[i, inter:])
            w2[("down", e)] = Shard(dest=lambda t, i=i: t[i])
        self.w13 = _param(self.count, 2 * inter, hidden, shards=w13)
        self.w2 = _param(self.count, hidden, inter, shards=w2)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H]; weights, ids [T, top_k] (global expert ids) -> sum over this rank's experts, [T, H].

        NOTE: experts are visited in ascending order and each adds its rows, as the reference implementation does,
        so the sums round the same way."""
        out = torch.zeros_like(x)
        local = ids - self.first
        for e in torch.unique(local[(local >= 0) & (local < self.count)]).tolist():
            tokens, slot = torch.where(local == e)
            h = silu_and_mul(F.linear(x[tokens], self.w13[e]))
            h = F.linear(h, self.w2[e]) * weights[tokens, slot, None]
            out.index_add_(0, tokens, h.to(out.dtype))
        return out


def route(logits: torch.Tensor, moe: MoEConfig, correction_bias: torch.Tensor | None = None):  # type: ignore[no-untyped-def]
    """Router logits [T, E] -> (weights [T, k] float32, expert ids [T, k])."""
    logits = logits.float()
    scores = logits.sigmoid() if moe.scoring == "sigmoid" else logits.softmax(dim=-1)
    if moe.topk_method == "greedy":
        weights, ids = scores.topk(moe.top_k, dim=-1)
    else:
        choice = scores + correction_bias if correction_bias is not None else scores
        grouped = choice.view(-1, moe.num_groups, moe.num_experts // moe.num_groups)
        if moe.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:  # group_limited_greedy
            group_scores = grouped.max(dim=-1).values
        keep = torch.zeros_like(group_scores).scatter_(
            1, group_scores.topk(moe.topk_groups, dim=-1).indices, 1
        )
        keep = keep.unsqueeze(-1).expand_as(grouped).reshape(-1, moe.num_experts).bool()
        fill = float("-inf") if moe.topk_method == "noaux_tc" else 0.0
        ids = choice.masked_fill(~keep, fill).topk(moe.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
    if moe.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if moe.scoring == "sigmoid" else 0.0))
    return weights * moe.routed_scaling_factor, ids


class SparseMoeBlock(nn.Module):
    """Router + experts (Qwen3-MoE, Mixtral)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.moe is not None
        self.moe = cfg.moe
        self.gate = Linear(cfg.hidden_size, cfg.moe.num_experts)
        self.experts = Experts(cfg.moe.num_experts, cfg.hidden_size, cfg.moe.intermediate_size)
        # Qwen3-MoE rounds the routing weights to the model dtype; Mixtral keeps them in fp32
        self.weights_in_model_dtype = cfg.family == "qwen3_moe"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.moe)
        if self.weights_in_model_dtype:
            weights = weights.to(x.dtype)
        return self.experts(x, weights, ids)


class MoeForCausalLM(DenseForCausalLM):
    """Qwen3-MoE and Mixtral: the dense decoder with MoE blocks in the sparse layers."""

    @staticmethod
    def make_mlp(cfg: ModelConfig, layer: int) -> nn.Module:
        assert cfg.moe is not None
        return SparseMoeBlock(cfg) if layer in cfg.moe.sparse_layers else MLP(cfg)

    def checkpoint_target(self, key: str) -> tuple[str, Hashable] | None:
        found = expert_target(key)
        if found is not None:
            return found if self._holds(found) else None
        return super().checkpoint_target(key.replace(".block_sparse_moe.gate.", ".mlp.gate."))

    def checkpoint_name(self, name: str, shard: Hashable) -> str:
        return expert_name(name, shard) or super().checkpoint_name(name, shard)

    def _holds(self, target: tuple[str, Hashable]) -> bool:
        """Whether this rank holds the expert (expert parallelism keeps a slice of them)."""
        name, shard = target
        if not hasattr(self, "_param_index"):
            self._param_index = dict(self.named_parameters())
        param = self._param_index.get(name)
        return param is None or shard in param.shards  # unknown names fall through to the loader's error
