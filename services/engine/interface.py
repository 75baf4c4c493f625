"""What the worker's services (and AsyncEngine) use of an engine. One `Engine` is one; so is a group of ranks
standing for several (services/worker/ranks.py), which implements each member explicitly."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from services.common.sampling_params import SamplingParams
    from services.engine.config import EngineConfig, EngineRuntime
    from services.engine.engine import Engine, LoadCounts, RequestOutput
    from services.engine.model_config import ModelConfig
    from services.engine.parallel.state import ParallelState


class ServingEngine(Protocol):
    config: EngineConfig
    model_config: ModelConfig
    runtime: EngineRuntime
    parallel: ParallelState

    @property
    def seqs(self) -> Mapping[str, object]:
        """The live requests, by id."""
        ...

    @property
    def layout_fingerprint(self) -> str: ...

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None: ...

    def add_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, arrival: float | None = None
    ) -> None: ...

    def abort(self, request_id: str) -> bool: ...

    def has_unfinished(self) -> bool: ...

    def step(self) -> list[RequestOutput]: ...

    def load_counts(self) -> LoadCounts: ...

    def replica_loads(self) -> list[LoadCounts]: ...

    def prefix_cache(self) -> Engine | None:
        """The engine whose block allocator is the worker's whole prefix cache (its KV events are the worker's);
        None when the worker's replicas keep caches of their own."""
        ...
