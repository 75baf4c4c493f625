"""The worker engine shared by prefill, decode and colocated workers."""

from __future__ import annotations

from services.common.errors import CheckpointError, RequestError
from services.common.sampling_params import SamplingParams
from services.engine.config import EngineConfig
from services.engine.engine import Engine, RequestOutput, Reservation
from services.engine.llm import LLM, Completion

__all__ = [
    "LLM",
    "CheckpointError",
    "Completion",
    "Engine",
    "EngineConfig",
    "RequestError",
    "RequestOutput",
    "Reservation",
    "SamplingParams",
]
