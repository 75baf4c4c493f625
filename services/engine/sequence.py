"""A request's state inside the engine: tokens, KV blocks and progress."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from services.common.logprob import TokenLogprob
from services.common.sampling_params import SamplingParams

PLACEHOLDER = -1  # a sampled token still on the GPU (overlapped decode); replaced once the host has it


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # queued for (re)admission
    RESERVED = "reserved"  # decode role: blocks held for KV that another worker is writing
    RUNNING = "running"
    HELD = "held"  # prefill role: done, KV kept until released (it is being sent)
    FINISHED = "finished"


@dataclass(eq=False)  # identity, not field equality: sequences live in lists and sets
class Sequence:
    request_id: str
    prompt_len: int
    token_ids: list[int]  # prompt followed by outputs
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    status: SeqStatus = SeqStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    num_hashed_blocks: int = 0  # leading full blocks registered in the prefix cache
    last_block_hash: int | None = None
    num_preemptions: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    generator: torch.Generator | None = None
    scheduled_time: float | None = None  # first time any of its tokens ran
    first_token_time: float | None = None
    matcher: Any = None  # structured output: which tokens may come next (grammar.Constraint)

    @classmethod
    def new(cls, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        return cls(request_id, len(prompt_ids), list(prompt_ids), params)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose ids the host knows (all but a trailing placeholder)."""
        n = len(self.token_ids)
        while n and self.token_ids[n - 1] == PLACEHOLDER:
            n -= 1
        return n

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[: self.prompt_len]

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_pending_tokens(self) -> int:
        """Tokens whose KV is not yet computed: a prompt (or chunk of it), or the last sampled token."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status in (SeqStatus.FINISHED, SeqStatus.HELD)
