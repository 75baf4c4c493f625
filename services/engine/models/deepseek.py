"""DeepSeek-V2/V3: multi-head latent attention (MLA) and MoE with shared experts and grouped routing.

MLA caches, per token and layer, one latent: the layer-normed compressed KV (kv_lora_rank) followed by the
rotated shared key part (qk_rope_head_dim). Decodes attend over the latents directly, all at once (kv_b_proj
absorbed into the query and the output; on GPUs through the paged decode kernel, so decodes run in CUDA graphs);
prompts expand each sequence's latents into per-head keys and values through kv_b_proj (the reference
formulation, per sequence).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from services.engine.attention import BoundAttention
from services.engine.model_config import ModelConfig
from services.engine.models.dense import MLP, PACKED
from services.engine.models.layers import (
    Linear,
    RMSNorm,
    RotaryEmbedding,
    _fused,
    _param,
    yarn_softmax_scale,
)
from services.engine.models.moe import MoeForCausalLM, local_experts, route
from services.engine.parallel.comm import Stage
from services.engine.parallel.moe import expert_stages
from services.engine.parallel.state import ParallelState

LORA_NORM_EPS = 1e-6  # the reference's q_a / kv_a layer norms use their default eps, not rms_norm_eps


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        assert cfg.mla is not None
        mla = self.mla = cfg.mla
        self.layer, self.num_heads, self.rotary = layer, cfg.num_heads, rotary
        q_out = cfg.num_heads * mla.qk_head_dim
        if mla.q_lora_rank is None:
            self.q_proj = Linear(cfg.hidden_size, q_out)
        else:
            self.q_a_proj = Linear(cfg.hidden_size, mla.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = Linear(mla.q_lora_rank, q_out)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, mla.latent_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, LORA_NORM_EPS)
        self.kv_b_proj = Linear(mla.kv_lora_rank, cfg.num_heads * (mla.qk_nope_head_dim + mla.v_head_dim))
        self.o_proj = Linear(cfg.num_heads * mla.v_head_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.scale = yarn_softmax_scale(cfg.rope, mla.qk_head_dim**-0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, attn: BoundAttention) -> torch.Tensor:
        mla, heads = self.mla, self.num_heads
        q = self.q_proj(x) if mla.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.unflatten(-1, (heads, mla.qk_head_dim))
        q_rot = q[..., mla.qk_nope_head_dim :]
        compressed, k_rot = self.kv_a_proj_with_mqa(x).split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
        compressed = self.kv_a_layernorm(compressed)
        rotated, latent = attn.rope_latent(self.layer, q_rot, k_rot, compressed, positions, self.rotary)
        if rotated is not q_rot:  # rotated out of place: q holds the rotated query from here on
            q_rot.copy_(rotated)
        return self.o_proj(attn.eager(self._attention, q, latent).flatten(1))

    def _attention(self, attn: BoundAttention, q: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """q [T, H, qk_head_dim] (rotated), the batch's latents [T, latent_dim] -> [T, H, v_head_dim]. Decodes (one
        new token each, first in the batch) attend together, absorbed; prompts over keys and values expanded from
        the latents. Rows past the batch's tokens (padding) are left unwritten."""
        mla, meta = self.mla, attn.meta
        q_nope, q_rot = q.split([mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)
        decodes = meta.num_decode_seqs
        if decodes and decodes == meta.num_seqs:  # rows past the decodes: padding (prefill graphs)
            return self._decode(q_nope[:decodes], q_rot[:decodes], attn)
        out = q.new_empty(q.shape[0], self.num_heads, mla.v_head_dim)
        if decodes:
            out[:decodes] = self._decode(q_nope[:decodes], q_rot[:decodes], attn)
        lens = list(zip(meta.query_lens_cpu[decodes:], meta.seq_lens_cpu[decodes:], strict=True))
        end = decodes + sum(n for n, _ in lens)
        # prompts with no cached prefix attend over their own latents: expanded for all of them at once
        fresh = self._expand(latent[decodes:end]) if lens and all(n == ctx for n, ctx in lens) else None
        start = decodes
        for i, (n, ctx) in enumerate(lens, decodes):
            rows = slice(start, start + n)
            if fresh is not None:
                local = slice(start - decodes, start - decodes + n)
                k, v = fresh[0][local], fresh[1][local]
            else:
                context = latent[rows] if n == ctx else attn.latent_context(self.layer, i).to(latent.dtype)
                k, v = self._expand(context)
            out[rows] = self._attend(q[rows], k, v, n, ctx)
            start += n
        return out

    def _decode(self, q_nope: torch.Tensor, q_rot: torch.Tensor, attn: BoundAttention) -> torch.Tensor:
        """One query token per sequence, [S, H, ...] -> [S, H, v_head_dim].

        Absorbed: q_nope goes through kv_b_proj's key half into the latent space and attends over the cached
        latents themselves, and the weighted latents go through its value half: the same result as expanding
        every cached latent into per-head keys and values, without expanding them."""
        mla, heads = self.mla, self.num_heads
        w = self.kv_b_proj.weight.view(heads, mla.qk_nope_head_dim + mla.v_head_dim, mla.kv_lora_rank)
        w_k, w_v = w.split([mla.qk_nope_head_dim, mla.v_head_dim], dim=1)
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_k).transpose(0, 1)  # [S, H, C], heads outermost
        out = attn.latent_decode(self.layer, q_latent, q_rot, self.scale)
        return torch.bmm(out.transpose(0, 1), w_v.mT).transpose(0, 1)

    def _expand(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents [N, latent_dim] -> per-head keys [N, H, qk_head_dim] and values [N, H, v_head_dim]."""
        mla = self.mla
        compressed, k_rot = latent.split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(compressed).unflatten(-1, (self.num_heads, mla.qk_nope_head_dim + mla.v_head_dim))
        k_nope, v = kv.split([mla.qk_nope_head_dim, mla.v_head_dim], dim=-1)
        return torch.cat([k_nope, k_rot.unsqueeze(1).expand(-1, self.num_heads, -1)], dim=-1), v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, ctx: int) -> torch.Tensor:
        """q [n, H, qk_head_dim] over ctx keys and values [ctx, H, ...] -> [n, H, v_head_dim]."""
        mask = causal_lower_right(n, ctx) if 1 < n < ctx else None
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            attn_mask=mask,
            is_causal=n == ctx and n > 1,
            scale=self.scale,
        )
        return o[0].transpose(0, 1)


class Router(nn.Module):
    """Router weights (scored in fp32) and, for V3, the expert-score correction bias used for selection only."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.moe is not None
        self.weight = _param(cfg.moe.num_experts, cfg.hidden_size)
        self.e_score_correction_bias = (
            _param(cfg.moe.num_experts) if cfg.moe.topk_method == "noaux_tc" else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits in fp32, as the reference computes them: fp32 products of the model-dtype values, summed
        in fp32. On GPUs without casting x and the weight first (two copy kernels and a read of x in fp32 each
        layer): a bf16 product is exact in fp32, so the matmul of the model-dtype values with fp32 accumulation
        and output is the same computation."""
        if _fused(x) and x.dim() == 2:
            from services.engine.kernels.gemv import MAX_ROWS, gemv

            if 1 <= x.shape[0] <= MAX_ROWS:
                return gemv(x, self.weight, out_dtype=torch.float32)
            return torch.mm(x, self.weight.t(), out_dtype=torch.float32)
        return F.linear(x.float(), self.weight.float())


class DeepseekMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelState) -> None:
        super().__init__()
        assert cfg.moe is not None
        self.moe = cfg.moe
        self.parallel = parallel
        self.gate = Router(cfg)
        self.experts = local_experts(cfg, parallel)
        self.shared_experts = (
            MLP(cfg, cfg.moe.intermediate_size * cfg.moe.num_shared_experts)
            if cfg.moe.num_shared_experts
            else None
        )

    def stages(self, x: torch.Tensor, batch: BoundAttention | None = None) -> Stage[torch.Tensor]:
        bias = self.gate.e_score_correction_bias
        weights, ids = route(self.gate(x), self.moe, bias.float() if bias is not None else None)
        rows = batch.dispatch_rows if batch is not None else None
        out = yield from expert_stages(self.experts, x, weights, ids, self.parallel, rows)
        return out + self.shared_experts(x) if self.shared_experts is not None else out


class DeepseekForCausalLM(MoeForCausalLM):
    # q/k/v are MLA's own projections here: only the MLPs' gate/up are packed
    packed_modules: ClassVar[dict[str, tuple[str, str]]] = {
        name: target for name, target in PACKED.items() if name in ("gate_proj", "up_proj")
    }

    @staticmethod
    def make_rotary(cfg: ModelConfig) -> RotaryEmbedding:
        assert cfg.mla is not None
        return RotaryEmbedding(cfg.mla.qk_rope_head_dim, cfg.max_position_embeddings, cfg.rope)

    @staticmethod
    def make_attention(
        cfg: ModelConfig, layer: int, rotary: RotaryEmbedding, parallel: ParallelState
    ) -> nn.Module:
        if parallel.tp > 1:
            raise ValueError(
                "latent attention (DeepSeek) is not tensor-parallel yet: use dp with ep instead of tp"
            )
        return MLAttention(cfg, layer, rotary)

    @staticmethod
    def make_mlp(cfg: ModelConfig, layer: int, parallel: ParallelState) -> nn.Module:
        assert cfg.moe is not None
        return DeepseekMoE(cfg, parallel) if layer in cfg.moe.sparse_layers else MLP(cfg, parallel=parallel)

    def checkpoint_target(self, key: str) -> tuple[str, Hashable] | None:
        parts = key.split(".")
        if len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= self.config.num_layers:
            return None  # multi-token-prediction layers: not used for generation
        return super().checkpoint_target(key)
