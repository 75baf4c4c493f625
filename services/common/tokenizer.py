"""Tokenizer and chat template of a checkpoint, read from `tokenizer.json` and `tokenizer_config.json`.

Uses the `tokenizers` library directly (what `transformers`' fast tokenizers wrap) and renders chat templates with
Jinja in a sandbox configured as `transformers` does, so token ids match the reference implementation.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from services.common.errors import CheckpointError, RequestError


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.exists():
            raise CheckpointError(
                f"{file}: not found; pdmesh needs the fast tokenizer file tokenizer.json in the checkpoint directory "
                "(convert a slow tokenizer once with transformers: AutoTokenizer.from_pretrained(dir).save_pretrained(dir))."
            )
        try:
            self._tok = HFTokenizer.from_file(str(file))
        except Exception as e:
            raise CheckpointError(f"{file}: cannot be read as a tokenizers file ({e}).") from e
        config_file = path / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_file.exists():
            try:
                config = json.loads(config_file.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{config_file}: not valid JSON ({e}).") from e
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.chat_template = _chat_template(path, config)
        self._template: jinja2.Template | None = None
        self.special_ids = set(self._special_ids())

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self._tok.token_to_id(self.eos_token) if self.eos_token else None

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    @property
    def raw(self) -> HFTokenizer:
        """The underlying `tokenizers` object (for streaming decoders)."""
        return self._tok

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.clean(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

    def clean(self, text: str) -> str:
        """The clean-up of spaces before punctuation that some checkpoints ask for (tokenizer_config.json)."""
        return _clean_up(text) if self.clean_up_spaces else text

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        if not self.chat_template:
            raise RequestError(
                "this model has no chat template (no 'chat_template' in tokenizer_config.json and no "
                "chat_template.jinja); use the completions API with a plain prompt instead."
            )
        if self._template is None:
            self._template = _jinja_env().from_string(self.chat_template)
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **kwargs,
            )
        except jinja2.TemplateError as e:
            raise RequestError(f"the chat template rejected these messages: {e}") from e
        except Exception as e:  # a model's template indexing or looping over a field of the wrong shape
            raise RequestError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from e

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kw: Any
    ) -> list[int]:
        # the template already writes any BOS token, so no special tokens are added again
        return self.encode(
            self.apply_chat_template(messages, add_generation_prompt, **kw), add_special_tokens=False
        )

    def _special_ids(self) -> list[int]:
        return [i for i, t in self._tok.get_added_tokens_decoder().items() if t.special]


def _chat_template(path: Path, config: dict[str, Any]) -> str | None:
    jinja_file = path / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return template


def _jinja_env() -> ImmutableSandboxedEnvironment:
    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _clean_up(text: str) -> str:
    for a, b in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(a, b)
    return text
