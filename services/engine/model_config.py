"""The parts of a Hugging Face `config.json` the engine uses, parsed and checked once."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.errors import CheckpointError

# architecture name in config.json -> model family implemented in services/engine/models/
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True
    interleaved: bool = False  # rotate (x0, x1), (x2, x3), ... pairs (DeepSeek) instead of the two halves


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    top_k: int
    intermediate_size: int  # per expert
    renormalize: bool  # divide the top-k weights by their sum
    scoring: str = "softmax"  # softmax | sigmoid
    topk_method: str = "greedy"  # greedy | group_limited_greedy (max per group) | noaux_tc (top-2 sum + bias)
    num_groups: int = 1
    topk_groups: int = 1
    routed_scaling_factor: float = 1.0
    num_shared_experts: int = 0
    sparse_layers: tuple[int, ...] = ()  # layers whose MLP is the MoE block (the others are dense)


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek): the cache holds a compressed latent per token."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelConfig:
    path: Path
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v projections
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool  # RMSNorm over each head of q and k (Qwen3)
    checkpoint_dtype: str
    eos_token_ids: tuple[int, ...] = field(default=())
    bos_token_id: int | None = None
    config_digest: str = ""  # hash of config.json: workers exchanging KV must serve the same model
    moe: MoEConfig | None = None
    mla: MLAConfig | None = None

    @property
    def fingerprint(self) -> str:
        return f"{self.architecture}:{self.config_digest}"

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(
                f"{path}: not a directory. Pass --model a local Hugging Face checkpoint directory "
                "(config.json, *.safetensors, tokenizer.json)."
            )
        cfg_file = path / "config.json"
        raw = _read_json(cfg_file, required=True)
        gen = _read_json(path / "generation_config.json", required=False)
        digest = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:12]
        return dataclasses.replace(cls.from_dict(raw, path, gen), config_digest=digest)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: Path, gen: dict[str, Any] | None = None) -> ModelConfig:
        cfg_file = path / "config.json"
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise CheckpointError(
                f"{cfg_file}: unsupported architecture {archs or '(none given)'}; "
                f"pdmesh serves {', '.join(sorted(SUPPORTED_ARCHITECTURES))}."
            )
        family = SUPPORTED_ARCHITECTURES[arch]

        def need(key: str) -> Any:
            if key not in raw:
                raise CheckpointError(f"{cfg_file}: missing required field '{key}' for {arch}.")
            return raw[key]

        if raw.get("use_sliding_window") or "sliding_attention" in (raw.get("layer_types") or []):
            raise CheckpointError(f"{cfg_file}: sliding-window attention is not supported yet.")
        if family == "mixtral" and raw.get("sliding_window"):
            raise CheckpointError(f"{cfg_file}: sliding-window attention is not supported yet.")
        num_heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        num_layers = int(need("num_hidden_layers"))
        head_dim = int(raw.get("head_dim") or hidden // num_heads)
        if raw.get("partial_rotary_factor", 1.0) != 1.0:
            raise CheckpointError(f"{cfg_file}: partial_rotary_factor != 1 is not supported.")
        eos = _token_ids(raw.get("eos_token_id")) + _token_ids((gen or {}).get("eos_token_id"))
        # Qwen2 always has q/k/v biases; Llama's `attention_bias` covers o_proj too.
        bias = family == "qwen2" or bool(raw.get("attention_bias", False))
        mla = _mla(raw) if family.startswith("deepseek") else None
        return cls(
            path=path,
            architecture=arch,
            family=family,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads) if mla is None else 1,
            head_dim=head_dim if mla is None else mla.qk_head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            rope=_rope(
                raw, cfg_file, interleaved=family == "deepseek_v2" or bool(raw.get("rope_interleave"))
            ),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bias,
            o_proj_bias=bias and family in ("llama", "deepseek_v2", "deepseek_v3"),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=family in ("qwen3", "qwen3_moe"),
            checkpoint_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
            eos_token_ids=tuple(dict.fromkeys(eos)),
            bos_token_id=raw.get("bos_token_id"),
            moe=_moe(raw, family, num_layers, cfg_file),
            mla=mla,
        )


def _read_json(file: Path, required: bool) -> dict[str, Any] | None:
    if not file.exists():
        if required:
            raise CheckpointError(f"{file}: not found; a checkpoint directory needs a config.json.")
        return None
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e}).") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object.")
    return data


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _rope(raw: dict[str, Any], cfg_file: Path, interleaved: bool = False) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (theta inside); older checkpoints `rope_theta` + `rope_scaling`.
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(
            f"{cfg_file}: rope type '{rope_type}' is not supported (supported: {', '.join(ROPE_TYPES)})."
        )
    factor = params.get("factor")
    original = int(params.get("original_max_position_embeddings", 8192))
    if rope_type == "yarn" and factor is None:
        factor = int(raw.get("max_position_embeddings", original)) / original
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(factor if factor is not None else 1.0),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=float(params.get("mscale") or 0.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
        interleaved=interleaved,
    )


def _moe(raw: dict[str, Any], family: str, num_layers: int, cfg_file: Path) -> MoEConfig | None:
    if family == "qwen3_moe":
        experts = int(raw.get("num_experts") or raw.get("num_local_experts") or 0)
        step = int(raw.get("decoder_sparse_step", 1)) or 1
        dense = set(raw.get("mlp_only_layers") or [])
        sparse = tuple(i for i in range(num_layers) if i not in dense and experts > 0 and (i + 1) % step == 0)
        return MoEConfig(
            experts,
            int(raw["num_experts_per_tok"]),
            int(raw["moe_intermediate_size"]),
            renormalize=bool(raw.get("norm_topk_prob", False)),
            sparse_layers=sparse,
        )
    if family == "mixtral":
        return MoEConfig(
            int(raw["num_local_experts"]),
            int(raw["num_experts_per_tok"]),
            int(raw["intermediate_size"]),
            renormalize=True,
            sparse_layers=tuple(range(num_layers)),
        )
    if family.startswith("deepseek"):
        experts = int(raw.get("n_routed_experts") or 0)
        first_dense = int(raw.get("first_k_dense_replace", 0))
        freq = int(raw.get("moe_layer_freq", 1)) or 1
        sparse = tuple(i for i in range(num_layers) if experts and i >= first_dense and i % freq == 0)
        v3 = family == "deepseek_v3"
        method = raw.get("topk_method") or ("noaux_tc" if v3 else "greedy")
        scoring = raw.get("scoring_func") or ("sigmoid" if v3 else "softmax")
        if method not in ("greedy", "group_limited_greedy", "noaux_tc") or scoring not in (
            "softmax",
            "sigmoid",
        ):
            raise CheckpointError(f"{cfg_file}: routing '{method}' with '{scoring}' scores is not supported.")
        return MoEConfig(
            experts,
            int(raw["num_experts_per_tok"]),
            int(raw["moe_intermediate_size"]),
            renormalize=bool(raw.get("norm_topk_prob", False)) and v3,
            scoring=scoring,
            topk_method=method,
            num_groups=int(raw.get("n_group") or 1),
            topk_groups=int(raw.get("topk_group") or 1),
            routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
            num_shared_experts=int(raw.get("n_shared_experts") or 0),
            sparse_layers=sparse,
        )
    return None


def _mla(raw: dict[str, Any]) -> MLAConfig:
    return MLAConfig(
        q_lora_rank=raw.get("q_lora_rank"),
        kv_lora_rank=int(raw["kv_lora_rank"]),
        qk_nope_head_dim=int(raw["qk_nope_head_dim"]),
        qk_rope_head_dim=int(raw["qk_rope_head_dim"]),
        v_head_dim=int(raw["v_head_dim"]),
    )
