"""Per-request sampling parameters, validated on construction."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from services.common.errors import RequestError

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100  # as OpenAI: a bias of +-100 forces or bans a token
MAX_LOGIT_BIAS_TOKENS = 1024
INT32_MAX = 2**31 - 1  # the gRPC contract's field widths: a larger value cannot cross to a worker
INT64_RANGE = range(-(2**63), 2**63)
# As vLLM: a smaller positive temperature samples greedily. Logits divided by a float32 temperature near its
# smallest values overflow to inf, and the draw from NaN probabilities is garbage.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    Order of application (as in `transformers`' warpers): logit bias, presence/frequency penalties, temperature, top-k,
    top-p, min-p, then a draw. `temperature == 0` is greedy (a temperature below GREEDY_TEMPERATURE is stored as 0).
    `logit_bias` is added to the logits first (greedy decoding included). Logprobs are those of the model's raw
    distribution (log-softmax of the logits before any of the above).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    stop_token_ids: tuple[int, ...] = field(default=())
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the sampled token's; n: plus the n most likely
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # (token id, added to its logit), ids unique
    logit_bias: tuple[tuple[int, float], ...] = field(default=())
    # structured output, as JSON: {"type": "json_object"} or {"type": "json_schema", "schema": {...}}
    response_format: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in bias)))
        checks = [
            (
                isinstance(self.max_tokens, int) and 1 <= self.max_tokens <= INT32_MAX,
                f"max_tokens must be an integer in [1, {INT32_MAX}]",
            ),
            (
                self.temperature >= 0 and math.isfinite(self.temperature),
                "temperature must be a finite number >= 0 (0 means greedy)",
            ),
            (
                isinstance(self.top_k, int) and -1 <= self.top_k <= INT32_MAX,
                "top_k must be -1, 0 (off) or a positive integer",
            ),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                f"logprobs must be between 0 and {MAX_LOGPROBS}",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (self.seed is None or self.seed in INT64_RANGE, "seed must fit in a signed 64-bit integer"),
            (
                all(0 <= t <= INT32_MAX for t in self.stop_token_ids),
                "stop_token_ids must be token ids (non-negative integers)",
            ),
            (
                all(0 <= t <= INT32_MAX for t, _ in self.logit_bias),
                "logit_bias keys must be token ids (non-negative integers)",
            ),
            (
                all(-MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS for _, b in self.logit_bias),
                f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}]",
            ),
            (
                len({t for t, _ in self.logit_bias}) == len(self.logit_bias),
                "logit_bias lists a token id twice",
            ),
            (
                len(self.logit_bias) <= MAX_LOGIT_BIAS_TOKENS,
                f"logit_bias takes at most {MAX_LOGIT_BIAS_TOKENS} tokens",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise RequestError(f"{message}.")
        if self.response_format is not None:
            _check_response_format(self.response_format)
        if self.temperature < GREEDY_TEMPERATURE:
            object.__setattr__(self, "temperature", 0.0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


def _check_response_format(text: str) -> None:
    try:
        spec = json.loads(text)
    except ValueError as e:
        raise RequestError(f"response_format is not valid JSON: {e}.") from e
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in ("json_object", "json_schema"):
        raise RequestError("response_format type must be json_object or json_schema.")
    if kind == "json_schema" and not isinstance(spec.get("schema"), dict):
        raise RequestError("a json_schema response_format needs its schema (a JSON object).")
