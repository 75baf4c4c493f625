"""The Python API: `LLM(model_dir).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from services.common.logprob import TokenLogprob
from services.common.sampling_params import SamplingParams
from services.engine.config import EngineConfig
from services.engine.engine import Engine

Prompt = str | list[int]


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)


class LLM:
    """Offline generation with continuous batching over all prompts given at once.

    Keyword arguments are `EngineConfig` fields, e.g. `LLM(dir, dtype="float32", max_num_batched_tokens=512)`.
    """

    def __init__(self, model: str, **engine_options: Any) -> None:
        self.engine = Engine(EngineConfig.from_kwargs(model, **engine_options))
        self.tokenizer = self.engine.tokenizer
        self._next_id = 0

    def generate(
        self,
        prompts: Prompt | SequenceOf[Prompt],
        params: SamplingParams | SequenceOf[SamplingParams] | None = None,
        progress: bool | None = None,
    ) -> list[Completion]:
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompt_ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompt_ids)
        if len(params) != len(prompt_ids):
            raise ValueError(f"got {len(prompt_ids)} prompts but {len(params)} sampling parameter sets.")
        for ids, p in zip(prompt_ids, params, strict=True):
            self.engine.check_request(ids, p)
        results: dict[str, Completion] = {}
        for ids, p in zip(prompt_ids, params, strict=True):
            rid = f"gen-{self._next_id}"
            self._next_id += 1
            self.engine.add_request(rid, ids, p)
            results[rid] = Completion(prompt_token_ids=ids)
        show = self.engine.config.progress if progress is None else progress
        try:
            with tqdm(
                total=len(results), desc="Generating", unit="req", disable=not show or len(results) < 2
            ) as bar:
                while self.engine.has_unfinished():
                    for out in self.engine.step():
                        c = results[out.request_id]
                        c.token_ids.extend(out.new_token_ids)
                        c.text += out.new_text
                        c.logprobs.extend(out.new_logprobs)
                        c.num_cached_tokens = out.num_cached_tokens
                        if out.finished:
                            c.finish_reason, c.stop_reason = out.finish_reason, out.stop_reason
                            bar.update()
        except BaseException:
            for rid in results:  # leave no request (and no KV block) behind
                self.engine.abort(rid)
            raise
        return list(results.values())

    def chat(
        self,
        conversations: list[dict[str, Any]] | list[list[dict[str, Any]]],
        params: SamplingParams | None = None,
    ) -> list[Completion]:
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        prompts = [self.tokenizer.encode_chat(c) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, params)

    def compute_logits(self, token_ids: list[int]) -> torch.Tensor:
        return self.engine.compute_logits(token_ids)
