"""The parts of a Hugging Face `config.json` the engine uses, parsed and checked once."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.engine.errors import CheckpointError

# architecture name in config.json -> model family implemented in services/engine/models/
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


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
        num_heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        head_dim = int(raw.get("head_dim") or hidden // num_heads)
        if raw.get("partial_rotary_factor", 1.0) != 1.0:
            raise CheckpointError(f"{cfg_file}: partial_rotary_factor != 1 is not supported.")
        eos = _token_ids(raw.get("eos_token_id")) + _token_ids((gen or {}).get("eos_token_id"))
        # Qwen2 always has q/k/v biases; Llama's `attention_bias` covers o_proj too.
        bias = family == "qwen2" or bool(raw.get("attention_bias", False))
        return cls(
            path=path,
            architecture=arch,
            family=family,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            rope=_rope(raw, cfg_file),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bias,
            o_proj_bias=bias and family == "llama",
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=family == "qwen3",
            checkpoint_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
            eos_token_ids=tuple(dict.fromkeys(eos)),
            bos_token_id=raw.get("bos_token_id"),
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


def _rope(raw: dict[str, Any], cfg_file: Path) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (theta inside); older checkpoints `rope_theta` + `rope_scaling`.
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(
            f"{cfg_file}: rope type '{rope_type}' is not supported (supported: {', '.join(ROPE_TYPES)})."
        )
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )
