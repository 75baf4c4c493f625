"""Mixture of experts: routing, stacked experts, and the Qwen3-MoE / Mixtral models.

Experts are stacked 3-D parameters (one matmul weight per expert along dim 0):
    w13[e]  [2 * inter, hidden]   gate rows, then up rows
    w2[e]   [hidden, inter]
A rank holds experts [first, first + count) (expert parallelism); the checkpoint's per-expert tensors land in
their slices, other ranks' experts are skipped at load.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.attention import BoundAttention
from services.engine.model_config import ModelConfig, MoEConfig
from services.engine.models.dense import MLP, DenseForCausalLM
from services.engine.models.layers import Linear, Shard, _fused, _param, silu_and_mul
from services.engine.parallel.comm import Stage
from services.engine.parallel.moe import expert_stages
from services.engine.parallel.state import ParallelState

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
        # another library's fused MoE in place of forward (e.g. rocm.aiter_moe.AiterExperts), same contract
        self.kernel: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H]; weights, ids [T, top_k] (global expert ids) -> sum over this rank's experts, [T, H].

        NOTE: each token adds its experts' outputs in ascending expert order, each cast to the model dtype first,
        as the reference implementation does, so the sums round the same way. Other ranks' experts add zero.
        On GPUs the sum runs in fp32 in one kernel (`_forward_fused`)."""
        if self.kernel is not None:
            return self.kernel(x, weights, ids)
        if _fused(x):
            return self._forward_fused(x, weights, ids)
        local = ids - self.first
        local = torch.where((local >= 0) & (local < self.count), local, self.count)
        local, order = local.sort(dim=1)  # ascending expert order within each token
        weights = weights.gather(1, order)
        t, k = local.shape
        tokens = torch.arange(t, device=x.device)[:, None].expand(t, k).reshape(-1)
        y = self.mlp(x, tokens, local.reshape(-1)).view(t, k, x.shape[1])
        y = (y * weights[..., None]).to(x.dtype)
        out = torch.zeros_like(x)
        for j in range(k):
            out += y[:, j]
        return out

    def _forward_fused(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Four kernels (kernels/moe.py); nothing is read back to the host, so shapes are fixed by the batch alone
        and CUDA graphs capture it."""
        from services.engine.kernels.moe import combine, expert_gemm, expert_order

        k = ids.shape[1]
        ids = ids.contiguous()
        order, ends = expert_order(ids, self.first, self.count)
        h = expert_gemm(x, order, ends, self.w13, top_k=k, silu=True)
        y = expert_gemm(h, order, ends, self.w2, top_k=1, silu=False)
        return combine(y, ids, weights, self.first, self.count, x.dtype)

    def mlp(self, x: torch.Tensor, rows: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """x[rows[i]] through local expert local_ids[i], unweighted; ids outside [0, count) give zeros.

        One grouped GEMM per projection over all experts: pairs sorted by expert, `offs` the end of each expert's
        rows. Shapes depend only on the number of pairs and nothing is read back to the host, so it runs inside
        CUDA graphs."""
        valid = (local_ids >= 0) & (local_ids < self.count)
        key = torch.where(valid, local_ids, self.count)
        key, order = key.sort(stable=True)
        experts = torch.arange(self.count, device=x.device, dtype=key.dtype)
        offs = torch.searchsorted(key, experts, right=True).to(torch.int32)
        h = grouped_mm(x[rows[order]], self.w13.mT, offs)
        h = grouped_mm(silu_and_mul(h), self.w2.mT, offs)
        out = torch.empty_like(h).index_copy_(0, order, h)  # rows past offs[-1] (invalid ids) are garbage
        return torch.where(valid[:, None], out, 0)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a [M, K] in groups ending at offs, b [G, K, N] -> [M, N]: group g's rows times b[g]."""
    if a.is_cuda and a.dtype != torch.bfloat16:  # the GPU grouped GEMM is bf16 only: one matmul per group
        out, start = a.new_empty(a.shape[0], b.shape[2]), 0
        for g, end in enumerate(offs.tolist()):
            out[start:end] = a[start:end] @ b[g]
            start = end
        return out
    return _grouped_mm(a, b, offs=offs)


_grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm  # public from torch 2.10


def route(  # type: ignore[no-untyped-def]
    logits: torch.Tensor,
    moe: MoEConfig,
    correction_bias: torch.Tensor | None = None,
    round_to: torch.dtype | None = None,
):
    """Router logits [T, E] -> (weights [T, k] float32, expert ids [T, k]); `round_to`: the weights rounded to
    that dtype (returned in it off the GPU path)."""
    if moe.topk_method == "greedy" and _fused(logits) and logits.stride(-1) == 1:
        from services.engine.kernels.moe_route import route_topk

        return route_topk(
            logits, moe.top_k, moe.scoring == "sigmoid", moe.renormalize, moe.routed_scaling_factor, round_to
        )
    weights, ids = _route(logits, moe, correction_bias)
    return (weights.to(round_to) if round_to is not None else weights), ids


def _route(logits: torch.Tensor, moe: MoEConfig, correction_bias: torch.Tensor | None):  # type: ignore[no-untyped-def]
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


def local_experts(cfg: ModelConfig, parallel: ParallelState) -> Experts:
    """This rank's slice of the experts."""
    assert cfg.moe is not None
    n = cfg.moe.num_experts
    if n % parallel.ep:
        raise ValueError(f"{n} experts cannot be split evenly over {parallel.ep} expert-parallel ranks")
    if parallel.tp > 1 and parallel.ep == 1:
        raise ValueError(
            "MoE layers with tensor parallelism need expert parallelism over the same ranks (ep = tp)"
        )
    count = n // parallel.ep
    return Experts(n, cfg.hidden_size, cfg.moe.intermediate_size, first=parallel.ep_rank * count, count=count)


class SparseMoeBlock(nn.Module):
    """Router + experts (Qwen3-MoE, Mixtral)."""

    def __init__(self, cfg: ModelConfig, parallel: ParallelState) -> None:
        super().__init__()
        assert cfg.moe is not None
        self.moe = cfg.moe
        self.parallel = parallel
        self.gate = Linear(cfg.hidden_size, cfg.moe.num_experts)
        self.experts = local_experts(cfg, parallel)
        # Qwen3-MoE rounds the routing weights to the model dtype; Mixtral keeps them in fp32
        self.weights_in_model_dtype = cfg.family == "qwen3_moe"

    def stages(self, x: torch.Tensor, batch: BoundAttention | None = None) -> Stage[torch.Tensor]:
        weights, ids = route(
            self.gate(x), self.moe, round_to=x.dtype if self.weights_in_model_dtype else None
        )
        rows = batch.dispatch_rows if batch is not None else None
        return (yield from expert_stages(self.experts, x, weights, ids, self.parallel, rows))


class MoeForCausalLM(DenseForCausalLM):
    """Qwen3-MoE and Mixtral: the dense decoder with MoE blocks in the sparse layers."""

    @staticmethod
    def make_mlp(cfg: ModelConfig, layer: int, parallel: ParallelState) -> nn.Module:
        assert cfg.moe is not None
        return (
            SparseMoeBlock(cfg, parallel) if layer in cfg.moe.sparse_layers else MLP(cfg, parallel=parallel)
        )

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
