"""Engine configuration: frozen after start-up. Values derived at start-up live in `EngineRuntime`."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

from services.engine.attention import BACKENDS
from services.engine.parallel.state import ParallelConfig
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
    cuda_graph_sizes: tuple[int, ...] | None = (
        None  # the batch sizes captured (default: buckets up to the max)
    )
    # with cuda_graphs on one rank: other steps (prefill, mixed) replayed from graphs cut at each attention, for
    # token counts in buckets up to max_num_batched_tokens
    prefill_graphs: bool = True
    overlap_scheduling: bool = True  # with CUDA graphs: launch the next decode step before reading this one
    load_format: str = "safetensors"  # safetensors | dummy (random weights: benchmarks, no checkpoint read)
    parallel: ParallelConfig = field(
        default_factory=ParallelConfig
    )  # tp x dp ranks, ep over all of them or none
    rank: int = 0  # this process among parallel.world ranks
    dist_init_method: str | None = None  # e.g. tcp://host:port (default: env://)
    tbo: bool = False  # two-batch overlap, where the batch is above the thresholds
    tbo_min_prefill_tokens: int = 4096
    tbo_min_decode_seqs: int = 128
    tbo_calibrate: bool = True  # on GPUs: time TBO on and off at start-up, keep it only where it is faster
    # expert dispatch with data-parallel attention: all_to_all (exact pairs; reads counts on the host) or
    # all_gather (fixed shapes: CUDA graphs, no host sync); auto: all_gather on GPUs, all_to_all elsewhere
    ep_dispatch: str = "auto"  # also mori (ROCm)
    # experts: torch (Triton kernels on GPUs, grouped GEMMs on CPU) or aiter (ROCm)
    moe_backend: str = "torch"
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
            (
                self.cuda_graph_sizes is None
                or (bool(self.cuda_graph_sizes) and min(self.cuda_graph_sizes) > 0),
                "cuda_graph_sizes must be positive batch sizes",
            ),
            (self.load_format in ("safetensors", "dummy"), "load_format must be safetensors or dummy"),
            (
                self.ep_dispatch in ("auto", "all_to_all", "all_gather", "mori"),
                "ep_dispatch must be auto, all_to_all, all_gather or mori",
            ),
            (self.moe_backend in ("torch", "aiter"), "moe_backend must be torch or aiter"),
            (
                self.ep_dispatch != "mori" or (self.parallel.dp > 1 and self.parallel.ep > 1),
                "ep_dispatch=mori needs data-parallel attention with expert parallelism (dp > 1, ep = tp x dp)",
            ),
            (
                not (self.moe_backend == "aiter" and self.ep_dispatch == "all_to_all"),
                "moe_backend=aiter cannot serve the all_to_all dispatch (it computes unweighted pairs): use "
                "all_gather or mori",
            ),
            (0 <= self.rank < self.parallel.world, f"rank must be in [0, {self.parallel.world})"),
            (
                self.tbo_min_prefill_tokens >= 1 and self.tbo_min_decode_seqs >= 1,
                "tbo_min_prefill_tokens and tbo_min_decode_seqs must be at least 1",
            ),
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

    def resolve_ep_dispatch(self, device: torch.device) -> str:
        if self.ep_dispatch == "auto":
            return "all_gather" if device.type == "cuda" else "all_to_all"
        return self.ep_dispatch

    def resolve_device(self, rank: int = 0) -> torch.device:
        """auto: cuda (one GPU per rank) if available, else cpu. cuda or cuda:N with several ranks: one GPU per
        rank, rank r on GPU N + r (so two parallel workers on one host can take GPUs 0-1 and 2-3)."""
        if self.device == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda", rank % torch.cuda.device_count())
            return torch.device("cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and self.parallel.world > 1:
            return torch.device("cuda", ((device.index or 0) + rank) % torch.cuda.device_count())
        return device

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
