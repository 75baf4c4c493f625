"""Build a model from a local Hugging Face checkpoint directory, copying each tensor straight into its parameter."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from services.common.errors import CheckpointError
from services.engine.model_config import ModelConfig
from services.engine.models.deepseek import DeepseekForCausalLM
from services.engine.models.dense import DenseForCausalLM
from services.engine.models.moe import MoeForCausalLM
from services.engine.parallel.state import ParallelState

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "llama": DenseForCausalLM,
    "qwen2": DenseForCausalLM,
    "qwen3": DenseForCausalLM,
    "qwen3_moe": MoeForCausalLM,
    "mixtral": MoeForCausalLM,
    "deepseek_v2": DeepseekForCausalLM,
    "deepseek_v3": DeepseekForCausalLM,
}
# tensors some checkpoints carry that the engine recomputes
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(
                f"{index}: not a valid safetensors index (needs a 'weight_map'): {e}"
            ) from e
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index}: lists shard files that are missing: {', '.join(missing)}.")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{path}: no *.safetensors weights found (other weight formats are not supported)."
        )
    return files


def load_model(
    cfg: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
    load_format: str = "safetensors",
    parallel: ParallelState | None = None,
) -> nn.Module:
    """The model this rank runs (its shards only, under tensor or expert parallelism), weights loaded."""
    with torch.device(device), _default_dtype(dtype):
        model = MODEL_CLASSES[cfg.family](cfg, parallel)
    if load_format == "dummy":
        random_weights(model)
    else:
        load_weights(model, cfg, progress)
    return model.eval()


@torch.no_grad()
def random_weights(model: nn.Module, std: float = 0.02) -> None:
    """Fill parameters in place (norm weights 1, the rest N(0, std)): a model to benchmark, no checkpoint read."""
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, std)


def load_weights(model: nn.Module, cfg: ModelConfig, progress: bool = True) -> None:
    """Copy every checkpoint tensor into its parameter shard; every shard must be filled exactly once.

    `model.checkpoint_target(key)` names (parameter, shard) for a checkpoint tensor, or None for a tensor this
    rank does not hold (another rank's experts); `model.checkpoint_name` names a shard back for messages.
    """
    params = dict(model.named_parameters())
    target, name_of = model.checkpoint_target, model.checkpoint_name
    loaded: set[tuple[str, object]] = set()
    files = safetensors_files(cfg.path)
    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    total = sum(len(h.keys()) for h in handles)
    with (
        torch.no_grad(),
        tqdm(total=total, desc="Loading weights", unit="tensor", disable=not progress) as bar,
    ):
        for file, handle in zip(files, handles, strict=True):
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                bar.update()
                if key.endswith(IGNORED_SUFFIXES) or (cfg.tie_word_embeddings and key == "lm_head.weight"):
                    continue
                found = target(key)
                if found is None:
                    continue
                name, shard_key = found
                param = params.get(name)
                shard = param.shards.get(shard_key) if param is not None else None  # type: ignore[attr-defined]
                if shard is None:
                    raise CheckpointError(
                        f"{file}: unexpected tensor '{key}' for {cfg.architecture} "
                        f"(config.json describes a different model, or the checkpoint is not a {cfg.architecture})."
                    )
                dest = shard.dest(param.data)
                tensor = shard.source(handle.get_tensor(key))
                if tuple(tensor.shape) != tuple(dest.shape):
                    raise CheckpointError(
                        f"{file}: tensor '{key}' has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)} "
                        f"from config.json; the weights and config.json do not describe the same model."
                    )
                dest.copy_(tensor)
                loaded.add((name, shard_key))
    missing = [
        name_of(name, shard_key)
        for name, param in params.items()
        for shard_key in param.shards  # type: ignore[attr-defined]
        if (name, shard_key) not in loaded
    ]
    if missing:
        raise CheckpointError(
            f"{cfg.path}: missing weight(s) in {', '.join(f.name for f in files)}: {', '.join(missing[:8])}"
            + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            + "; the checkpoint is incomplete."
        )
