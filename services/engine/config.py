"""Engine configuration: frozen after start-up. Values derived at start-up live in `EngineRuntime`."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from services.engine.attention import BACKENDS
from services.engine.scheduler import ROLES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    model: str
    role: str = "colocated"  # colocated | prefill | decode
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # auto: the checkpoint's dtype on GPU, float32 on CPU
    block_size: int = 16
    num_blocks: int | None = None  # None: sized from memory
    kv_cache_memory_gb: float | None = None  # None: on GPU what gpu_memory_utilization leaves; on CPU 1 GiB
    gpu_memory_utilization: float = 0.90
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # token budget per step (prefill chunk size)
    max_model_len: int | None = None  # None: the model's, capped by KV capacity
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # auto: triton on CUDA (with Triton installed), else torch
    cuda_graphs: bool = True  # replay decode steps from CUDA graphs (triton backend on CUDA)
    cuda_graph_max_batch: int = 256  # largest decode batch captured; larger ones run eagerly
    overlap_scheduling: bool = True  # with CUDA graphs: launch the next decode step before reading this one
    load_format: str = "safetensors"  # safetensors | dummy (random weights: benchmarks, no checkpoint read)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.role in ROLES, f"role must be one of {', '.join(ROLES)}, got '{self.role}'"),
            (
                self.dtype == "auto" or self.dtype in DTYPES,
                f"dtype must be auto or one of {', '.join(DTYPES)}",
            ),
            (self.attention_backend in BACKENDS, f"attention_backend must be one of {', '.join(BACKENDS)}"),
            (
                self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
                "block_size must be a power of 2",
            ),
            (self.num_blocks is None or self.num_blocks > 0, "num_blocks must be positive"),
            (self.max_num_seqs > 0, "max_num_seqs must be positive"),
            (self.max_num_batched_tokens > 0, "max_num_batched_tokens must be positive"),
            (0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization must be in (0, 1]"),
            (self.max_model_len is None or self.max_model_len > 0, "max_model_len must be positive"),
            (self.cuda_graph_max_batch > 0, "cuda_graph_max_batch must be positive"),
            (self.load_format in ("safetensors", "dummy"), "load_format must be safetensors or dummy"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid engine configuration: {message}.")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(
                f"unknown engine option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(model=model, **kwargs)

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolve_dtype(self, device: torch.device, checkpoint_dtype: str) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if device.type == "cpu":
            return torch.float32
        return DTYPES.get(checkpoint_dtype, torch.bfloat16)


@dataclass(frozen=True)
class EngineRuntime:
    """What start-up derived from the config, the checkpoint and the machine."""

    device: torch.device
    dtype: torch.dtype
    num_blocks: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
