"""Structured outputs: a response format (JSON, or JSON matching a schema) compiled to a grammar over this model's
vocabulary (xgrammar), and per sequence a matcher that says which tokens may come next.

The sampler masks the logits of every row with a matcher (a bitmask filled on the host, one int32 per 32 tokens,
copied to the device without a sync); each sampled token is then fed to its matcher before the next step's mask
is filled, so batches with such rows are not launched ahead of the previous step (no overlap scheduling).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from services.common.errors import RequestError

JSON_OBJECT = "json_object"
JSON_SCHEMA = "json_schema"


class Grammars:
    """Compiles response formats for one model (cached by their text) and makes matchers."""

    def __init__(self, model_path: str | Path, vocab_size: int) -> None:
        self.model_path = str(model_path)
        self.vocab_size = vocab_size
        self._compiler: Any = None
        self.compiled = lru_cache(maxsize=256)(self._compile)

    def _compiler_for_model(self) -> Any:
        if self._compiler is None:
            try:
                import xgrammar
                from transformers import AutoTokenizer
            except ImportError as e:
                raise RequestError(
                    "response_format needs the xgrammar package on the workers (pip install xgrammar)."
                ) from e
            tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size)
            self._compiler = xgrammar.GrammarCompiler(info)
        return self._compiler

    def _compile(self, response_format: str) -> Any:
        spec = json.loads(response_format)
        compiler = self._compiler_for_model()
        try:
            # json_object: any JSON object (xgrammar's builtin JSON grammar would allow any JSON value)
            schema = {"type": "object"} if spec["type"] == JSON_OBJECT else spec["schema"]
            return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
        except (RuntimeError, ValueError) as e:  # xgrammar reports an unusable schema so
            raise RequestError(f"response_format: the JSON schema cannot be compiled: {e}") from e

    def matcher(self, response_format: str) -> Any:
        import xgrammar

        return xgrammar.GrammarMatcher(self.compiled(response_format))


def token_bitmask(matchers: list[Any], vocab_size: int) -> Any:
    """[rows, ceil(vocab / 32)] int32 on the host: each row's allowed next tokens (all for rows without one)."""
    import xgrammar

    bitmask = xgrammar.allocate_token_bitmask(len(matchers), vocab_size)
    for row, matcher in enumerate(matchers):
        if matcher is not None and not matcher.is_terminated():
            matcher.fill_next_token_bitmask(bitmask, row)
    return bitmask


def apply_bitmask(logits: Any, bitmask: Any) -> None:
    """Disallowed tokens' logits to -inf, in place (logits [rows, >= vocab] on any device)."""
    import xgrammar

    xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True))
