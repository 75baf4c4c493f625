"""OpenAI request schemas (validated by pydantic) and the mapping to engine sampling parameters.

Fields beyond OpenAI's (`top_k`, `min_p`, `ignore_eos`, `stop_token_ids`, ...) follow vLLM's names. Parameters we
do not implement are refused with a 400 rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from services.common.errors import RequestError
from services.common.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS, SamplingParams
from services.router.errors import APIError
from services.router.tool_calls import ToolPlan, template_messages

MAX_N = 16  # choices per request (each prompt's n samples share its prefill through the prefix cache)

# Names the chat template is rendered with already: a chat_template_kwargs entry may not set them.
RESERVED_TEMPLATE_KWARGS = ("messages", "add_generation_prompt", "tools", "bos_token", "eos_token", "self")


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _lone_surrogate(data: Any) -> str | None:
    """Where in a parsed JSON body a string holds a lone surrogate (a valid JSON escape such as \\ud800 that is no
    Unicode character: the tokenizer, gRPC and JSON responses cannot encode it); None when there is none."""
    stack: list[tuple[tuple[str, ...], Any]] = [((), data)]
    while stack:  # NOTE: a loop, not recursion: JSON nesting is as deep as the client likes
        path, value = stack.pop()
        if isinstance(value, str):
            if not _is_unicode(value):
                return ".".join(path) or "the body"
        elif isinstance(value, dict):
            for key, item in value.items():
                if not _is_unicode(str(key)):
                    return ".".join((*path, str(key).encode("utf-8", "backslashreplace").decode()))
                if isinstance(item, str | dict | list):
                    stack.append(((*path, str(key)), item))
        elif isinstance(value, list):
            stack.extend(
                ((*path, str(i)), item) for i, item in enumerate(value) if isinstance(item, str | dict | list)
            )
    return None


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions
    top_k: int | None = None
    min_p: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False  # add each choice's generated token ids (as vLLM does)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = _lone_surrogate(data)
        if where is not None:
            raise PydanticCustomError(
                "invalid_unicode",
                "{where} is not valid Unicode: it holds a lone UTF-16 surrogate (\\ud800-\\udfff).",
                {"where": where},
            )
        return data

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences")
        return stops

    def check_supported(self, vocab: int) -> None:
        for token, bias in self.parsed_logit_bias():
            if token >= vocab:
                raise APIError(
                    400,
                    f"logit_bias token id {token} is outside the vocabulary: ids are in [0, {vocab}).",
                    param="logit_bias",
                )
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise APIError(
                    400,
                    f"logit_bias values must be in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], got {bias} for "
                    f"token {token}.",
                    param="logit_bias",
                )

    @property
    def num_samples(self) -> int:
        """Samples drawn per prompt."""
        return self.n

    def samples(self, params: SamplingParams) -> list[SamplingParams]:
        """Each sample's parameters: sample j draws with seed + j (so each is the single-sample output of that
        seed), or unseeded when no seed was given."""
        if self.seed is None:
            return [params] * self.num_samples
        wrap = 2**64
        seeds = [
            (self.seed + j + 2**63) % wrap - 2**63 for j in range(self.num_samples)
        ]  # a signed 64-bit value
        return [dataclasses.replace(params, seed=seed) for seed in seeds]

    def parsed_logit_bias(self) -> tuple[tuple[int, float], ...]:
        """OpenAI's {"token id": bias} as (token id, bias) pairs."""
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            if not key.strip().isdigit():
                raise APIError(
                    400,
                    f"logit_bias keys must be token ids (non-negative integers as strings), got {key!r}.",
                    param="logit_bias",
                )
            pairs.append((int(key), bias))
        return tuple(pairs)

    def sampling(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_k=self.top_k or 0,
                top_p=1.0 if self.top_p is None else self.top_p,
                min_p=self.min_p or 0.0,
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                seed=self.seed,
                stop=tuple(self.stop or ()),
                stop_token_ids=tuple(self.stop_token_ids or ()),
                ignore_eos=self.ignore_eos,
                logprobs=logprobs,
                include_stop_str_in_output=self.include_stop_str_in_output,
                skip_special_tokens=self.skip_special_tokens,
                logit_bias=self.parsed_logit_bias(),
            )
        except RequestError as e:
            raise APIError(400, str(e)) from e

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @property
    def num_samples(self) -> int:
        """n, or best_of (of which the n best are returned)."""
        return max(self.n, self.best_of or 1)

    def check_supported(self, vocab: int) -> None:
        super().check_supported(vocab)
        if self.echo:
            raise APIError(400, "echo is not supported.", param="echo")
        if self.best_of is not None:
            if not self.n <= self.best_of <= MAX_N:
                raise APIError(400, f"best_of must be between n ({self.n}) and {MAX_N}.", param="best_of")
            if self.stream and self.best_of > 1:
                raise APIError(
                    400, "best_of > 1 cannot be streamed: the best are known at the end.", param="best_of"
                )
        if self.suffix:
            raise APIError(400, "suffix is not supported.", param="suffix")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    # typed as OpenAI's, since chat templates iterate and index them
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise APIError(
                    400, f"message content of type '{part.get('type')}' is not supported; send text."
                )
            text = part.get("text", "")
            if not isinstance(text, str):
                raise APIError(400, "a text part's 'text' must be a string.", param="messages")
            parts.append(text)
        return "".join(parts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        taken = [k for k in RESERVED_TEMPLATE_KWARGS if k in (v or {})]
        if taken:
            raise PydanticCustomError(
                "reserved_template_kwarg",
                "may not set '{name}': the template gets it from the request's own fields or the tokenizer.",
                {"name": taken[0]},
            )
        return v

    def check_supported(self, vocab: int) -> None:
        super().check_supported(vocab)
        if not self.messages:
            raise APIError(400, "messages must not be empty.", param="messages")
        self.structured_format()  # a malformed response_format is a 400 before anything is sent
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true.", param="top_logprobs")

    def tool_plan(self, fmt: str) -> ToolPlan:
        """tools and tool_choice, checked; fmt: the tool-call format of the model's chat template."""
        return ToolPlan.from_request(self.tools, self.tool_choice, self.parallel_tool_calls, fmt)

    def structured_format(self, tools: ToolPlan | None = None) -> str | None:
        """OpenAI's response_format as the workers take it: {"type": "json_object"} or {"type": "json_schema",
        "schema": ...} (JSON text), None for plain text. A required or named tool_choice is a schema too."""
        rf = self.response_format or {}
        kind = rf.get("type", "text")
        forced = tools.schema() if tools is not None else None
        if forced is not None:
            if kind != "text":
                raise APIError(
                    400,
                    "response_format cannot be combined with tool_choice 'required' or a named function: both "
                    "decide the output's form.",
                    param="response_format",
                )
            return json.dumps({"type": "json_schema", "schema": forced})
        if kind == "text":
            return None
        if kind == "json_object":
            return json.dumps({"type": "json_object"})
        if kind == "json_schema":
            spec = rf.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise APIError(
                    400,
                    "response_format json_schema needs json_schema.schema, a JSON Schema object.",
                    param="response_format",
                )
            return json.dumps({"type": "json_schema", "schema": schema})
        raise APIError(
            400,
            f"response_format type must be text, json_object or json_schema, got {kind!r}.",
            param="response_format",
        )

    def sampling(
        self, max_tokens: int, logprobs: int | None, tools: ToolPlan | None = None
    ) -> SamplingParams:
        params = super().sampling(max_tokens, logprobs)
        return dataclasses.replace(params, response_format=self.structured_format(tools))

    def rendered_messages(self) -> list[dict[str, Any]]:
        out = []
        for m in self.messages:
            msg = m.model_dump(exclude_none=True)
            msg["content"] = m.text()
            out.append(msg)
        return template_messages(out)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
