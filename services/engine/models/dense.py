"""Dense decoder-only transformers: Llama family, Qwen2/Qwen2.5 (q/k/v bias) and Qwen3 (q/k RMSNorm).

Parameter names follow the Hugging Face checkpoints, except that q/k/v and gate/up are packed
(`qkv_proj`, `gate_up_proj`); `PACKED` maps checkpoint names onto those shards.
Inputs are flattened batches: `input_ids` and `positions` are [num_tokens], hidden states [num_tokens, hidden].

The forward pass is a generator of stages (`stages`): it yields at every collective (tensor-parallel
all-reduces, expert-parallel all-to-alls) so that two micro-batches can interleave (two-batch overlap); `forward`
runs it straight through.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from torch import nn

from services.engine.attention import BoundAttention
from services.engine.model_config import ModelConfig
from services.engine.models.layers import Embedding, Linear, RMSNorm, RotaryEmbedding, silu_and_mul
from services.engine.parallel.comm import Stage, run
from services.engine.parallel.linear import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from services.engine.parallel.state import ParallelState

# checkpoint module name -> (packed module name, shard)
PACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}


def column(parallel: ParallelState, in_features: int, out: dict[str, int] | int, bias: bool) -> nn.Module:
    if parallel.tp == 1:
        return Linear(in_features, out, bias=bias)
    return ColumnParallelLinear(in_features, out, bias, parallel.tp_rank, parallel.tp)


def row(parallel: ParallelState, in_features: int, out_features: int, bias: bool) -> nn.Module:
    if parallel.tp == 1:
        return Linear(in_features, out_features, bias=bias)
    return RowParallelLinear(
        in_features, out_features, bias, parallel.tp_rank, parallel.tp, parallel.tp_group
    )


def call(module: nn.Module, *args: torch.Tensor | BoundAttention) -> Stage[torch.Tensor]:
    """A module as a stage: those that communicate have `stages`; the others are plain calls."""
    if hasattr(module, "stages"):
        return (yield from module.stages(*args))
    return module(*args)


def _heads(total: int, parallel: ParallelState, what: str) -> int:
    if total % parallel.tp:
        raise ValueError(f"{what} ({total}) must be divisible by the tensor-parallel size ({parallel.tp})")
    return total // parallel.tp


class Attention(nn.Module):
    def __init__(
        self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding, parallel: ParallelState
    ) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = _heads(cfg.num_heads, parallel, "attention heads")
        self.num_kv_heads = _heads(cfg.num_kv_heads, parallel, "KV heads")
        self.head_dim = cfg.head_dim
        pieces = {"q": cfg.q_size, "k": cfg.kv_size, "v": cfg.kv_size}
        self.qkv_proj = column(parallel, cfg.hidden_size, pieces, cfg.attention_bias)
        self.o_proj = row(parallel, cfg.q_size, cfg.hidden_size, cfg.o_proj_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rotary = rotary

    def stages(self, positions: torch.Tensor, x: torch.Tensor, attn: BoundAttention) -> Stage[torch.Tensor]:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        norms = (self.q_norm, self.k_norm) if self.q_norm is not None and self.k_norm is not None else None
        q, k = attn.rope_and_store(self.layer, q, k, v, positions, self.rotary, norms)
        return (yield from call(self.o_proj, attn(self.layer, q, k, v).flatten(1)))


class MLP(nn.Module):
    def __init__(
        self, cfg: ModelConfig, intermediate_size: int | None = None, parallel: ParallelState | None = None
    ) -> None:
        super().__init__()
        parallel = parallel or ParallelState.single()
        size = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = column(parallel, cfg.hidden_size, {"gate": size, "up": size}, cfg.mlp_bias)
        self.down_proj = row(parallel, size, cfg.hidden_size, cfg.mlp_bias)

    def stages(self, x: torch.Tensor, batch: BoundAttention | None = None) -> Stage[torch.Tensor]:
        return (yield from call(self.down_proj, silu_and_mul(self.gate_up_proj(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run(self.stages(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = attn
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp

    def stages(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, attn: BoundAttention
    ) -> Stage[tuple[torch.Tensor, torch.Tensor]]:
        """(x, residual) -> (x, residual): each residual add is fused into the norm that follows it."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = yield from call(self.self_attn, positions, h, attn)
        h, residual = self.post_attention_layernorm(h, residual)
        h = yield from call(self.mlp, h, attn)
        return h, residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: list[DecoderLayer], parallel: ParallelState) -> None:
        super().__init__()
        if parallel.tp == 1:
            self.embed_tokens: nn.Module = Embedding(cfg.vocab_size, cfg.hidden_size)
        else:
            self.embed_tokens = VocabParallelEmbedding(
                cfg.vocab_size, cfg.hidden_size, parallel.tp_rank, parallel.tp, parallel.tp_group
            )
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def stages(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: BoundAttention
    ) -> Stage[torch.Tensor]:
        x = yield from call(self.embed_tokens, input_ids)
        residual = None
        for layer in self.layers:
            x, residual = yield from layer.stages(positions, x, residual, attn)
        return self.norm(x, residual)[0]


class DenseForCausalLM(nn.Module):
    """A decoder-only model: `make_attention` and `make_mlp` give each layer's blocks (overridden by MoE and MLA
    models); checkpoint tensor names map onto parameters through `checkpoint_target`."""

    packed_modules = PACKED

    def __init__(self, cfg: ModelConfig, parallel: ParallelState | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.parallel = parallel = parallel or ParallelState.single()
        rotary = self.make_rotary(cfg)
        layers = [
            DecoderLayer(cfg, self.make_attention(cfg, i, rotary, parallel), self.make_mlp(cfg, i, parallel))
            for i in range(cfg.num_layers)
        ]
        self.model = DecoderModel(cfg, layers, parallel)
        if parallel.tp == 1:
            self.lm_head: nn.Module = Linear(cfg.hidden_size, cfg.vocab_size)
        else:
            self.lm_head = ParallelLMHead(
                cfg.hidden_size, cfg.vocab_size, parallel.tp_rank, parallel.tp, parallel.tp_group
            )
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def make_rotary(cfg: ModelConfig) -> RotaryEmbedding:
        return RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope)

    @staticmethod
    def make_attention(
        cfg: ModelConfig, layer: int, rotary: RotaryEmbedding, parallel: ParallelState
    ) -> nn.Module:
        return Attention(cfg, layer, rotary, parallel)

    @staticmethod
    def make_mlp(cfg: ModelConfig, layer: int, parallel: ParallelState) -> nn.Module:
        return MLP(cfg, parallel=parallel)

    def checkpoint_target(self, key: str) -> tuple[str, Hashable] | None:
        """(parameter name, shard) of a checkpoint tensor: '...q_proj.weight' -> ('...qkv_proj.weight', 'q')."""
        parts = key.split(".")
        for i, part in enumerate(parts):
            if part in self.packed_modules:
                module, shard = self.packed_modules[part]
                return ".".join([*parts[:i], module, *parts[i + 1 :]]), shard
        return key, None

    def checkpoint_name(self, name: str, shard: Hashable) -> str:
        """The checkpoint name of a parameter shard, for error messages (the reverse of checkpoint_target)."""
        for original, (module, key) in self.packed_modules.items():
            if key == shard and f".{module}." in f".{name}":
                return f".{name}".replace(f".{module}.", f".{original}.")[1:]
        return name if shard is None else f"{name}[{shard}]"

    def stages(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: BoundAttention
    ) -> Stage[torch.Tensor]:
        return (yield from self.model.stages(input_ids, positions, attn))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: BoundAttention) -> torch.Tensor:
        return run(self.stages(input_ids, positions, attn))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return run(call(self.lm_head, hidden))
