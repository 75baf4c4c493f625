"""Dense decoder-only transformers: Llama family, Qwen2/Qwen2.5 (q/k/v bias) and Qwen3 (q/k RMSNorm).

Parameter names follow the Hugging Face checkpoints, except that q/k/v and gate/up are packed
(`qkv_proj`, `gate_up_proj`); `PACKED` maps checkpoint names onto those shards.
Inputs are flattened batches: `input_ids` and `positions` are [num_tokens], hidden states [num_tokens, hidden].
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from torch import nn

from services.engine.attention import BoundAttention
from services.engine.model_config import ModelConfig
from services.engine.models.layers import Embedding, Linear, RMSNorm, RotaryEmbedding, silu_and_mul

# checkpoint module name -> (packed module name, shard)
PACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = Linear(
            cfg.hidden_size, {"q": cfg.q_size, "k": cfg.kv_size, "v": cfg.kv_size}, bias=cfg.attention_bias
        )
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_proj_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rotary = rotary

    def forward(self, positions: torch.Tensor, x: torch.Tensor, attn: BoundAttention) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(
            [
                self.num_heads * self.head_dim,
                self.num_kv_heads * self.head_dim,
                self.num_kv_heads * self.head_dim,
            ],
            dim=-1,
        )
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = attn.rope_and_store(self.layer, q, k, v, positions, self.rotary)
        return self.o_proj(attn(self.layer, q, k, v).flatten(1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        size = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, {"gate": size, "up": size}, bias=cfg.mlp_bias)
        self.down_proj = Linear(size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = attn
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, attn: BoundAttention
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (x, residual): each residual add is fused into the norm that follows it."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, attn)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: list[DecoderLayer]) -> None:
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: BoundAttention) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, attn)
        return self.norm(x, residual)[0]


class DenseForCausalLM(nn.Module):
    """A decoder-only model: `make_attention` and `make_mlp` give each layer's blocks (overridden by MoE and MLA
    models); checkpoint tensor names map onto parameters through `checkpoint_target`."""

    packed_modules = PACKED

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        rotary = self.make_rotary(cfg)
        layers = [
            DecoderLayer(cfg, self.make_attention(cfg, i, rotary), self.make_mlp(cfg, i))
            for i in range(cfg.num_layers)
        ]
        self.model = DecoderModel(cfg, layers)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def make_rotary(cfg: ModelConfig) -> RotaryEmbedding:
        return RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope)

    @staticmethod
    def make_attention(cfg: ModelConfig, layer: int, rotary: RotaryEmbedding) -> nn.Module:
        return Attention(cfg, layer, rotary)

    @staticmethod
    def make_mlp(cfg: ModelConfig, layer: int) -> nn.Module:
        return MLP(cfg)

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

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: BoundAttention) -> torch.Tensor:
        return self.model(input_ids, positions, attn)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
