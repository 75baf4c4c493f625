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

import numpy as np
import torch

from services.common.errors import RequestError

JSON_OBJECT = "json_object"
JSON_SCHEMA = "json_schema"


class Constraint:
    """One request's matcher, and the tokens JSON may ever hold (none with a raw control character: inside a
    string JSON needs them escaped, and the compact format puts no whitespace but spaces between values)."""

    def __init__(self, matcher: Any, printable: torch.Tensor) -> None:
        self.matcher = matcher
        self.printable = printable  # [vocab / 32] int32 bitmask

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        if not self.matcher.is_terminated():
            self.matcher.fill_next_token_bitmask(bitmask, row)
            bitmask[row] &= self.printable

    def accept(self, token: int) -> None:
        if not self.matcher.is_terminated():
            self.matcher.accept_token(token)

    @property
    def done(self) -> bool:
        return self.matcher.is_terminated()


class Grammars:
    """Compiles response formats for one model (cached by their text) and makes matchers."""

    def __init__(self, model_path: str | Path, vocab_size: int) -> None:
        self.model_path = str(model_path)
        self.vocab_size = vocab_size
        self._compiler: Any = None
        self._printable: torch.Tensor | None = None
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
            self._printable = _printable_tokens(info.decoded_vocab, self.vocab_size)
        return self._compiler

    def _compile(self, response_format: str) -> Any:
        spec = json.loads(response_format)
        compiler = self._compiler_for_model()
        try:
            # json_object: any JSON object (xgrammar's builtin JSON grammar would allow any JSON value)
            schema = {"type": "object"} if spec["type"] == JSON_OBJECT else spec["schema"]
            return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
        except (RuntimeError, ValueError) as e:  # xgrammar reports an unusable schema so
            raise RequestError(
                "the output's JSON schema (response_format's, or the tools' parameters under tool_choice "
                f"'required' or a named function) cannot be compiled: {e}"
            ) from e

    def matcher(self, response_format: str) -> Constraint:
        import xgrammar

        compiled = self.compiled(response_format)
        assert self._printable is not None
        return Constraint(xgrammar.GrammarMatcher(compiled), self._printable)


def _printable_tokens(decoded_vocab: list[bytes], vocab_size: int) -> torch.Tensor:
    """Bitmask (bit t of word t // 32 set: allowed) of the tokens without a byte below 0x20."""
    allowed = np.zeros(-(-vocab_size // 32) * 32, dtype=bool)
    for t, text in enumerate(decoded_vocab[:vocab_size]):
        allowed[t] = not any(b < 0x20 for b in text)
    bits = allowed.reshape(-1, 32).astype(np.uint64) << np.arange(32, dtype=np.uint64)
    return torch.from_numpy(bits.sum(axis=1).astype(np.uint32).view(np.int32))


def token_bitmask(constraints: list[Constraint | None], vocab_size: int) -> torch.Tensor:
    """[rows, ceil(vocab / 32)] int32 on the host: each row's allowed next tokens (all for rows without one)."""
    import xgrammar

    bitmask = xgrammar.allocate_token_bitmask(len(constraints), vocab_size)
    for row, constraint in enumerate(constraints):
        if constraint is not None:
            constraint.fill(bitmask, row)
    return bitmask


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Disallowed tokens' logits to -inf, in place (logits [rows, >= vocab] on any device)."""
    import xgrammar

    xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True))
