"""Tool calling: the tools a chat request offers, what the model may or must write, and the calls read back.

- tool_choice `none`: the chat template is not shown the tools; the output is text.
- `auto` (the default when tools are given): the template shows the tools, and the output is read in the model
  family's format (`hermes`: Qwen2.5/Qwen3's `<tool_call>{json}</tool_call>`; `llama3_json`: Llama 3.x's bare
  `{"name": ..., "parameters": ...}`, `;`-separated when several) into content and calls.
- `required` / a named function: the output is constrained (structured outputs) to a JSON array of
  `{"name", "parameters"}` / to that function's arguments, and becomes the message's tool calls.

A `CallReader` reads one choice's text as it streams and returns the same content and calls whatever the text's
pieces are, so a streamed answer equals the whole one. Text that looked like a call but does not parse is given
back as content: nothing the model wrote is lost.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from services.router.errors import APIError

FORMATS = ("auto", "hermes", "llama3_json", "none")
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


def detect_format(chat_template: str | None) -> str:
    """The tool-call format a chat template teaches its model ('none' when it shows no tools)."""
    template = chat_template or ""
    if HERMES_START in template:
        return "hermes"
    if PYTHON_TAG in template or ("<|start_header_id|>" in template and "parameters" in template):
        return "llama3_json"
    return "none"


@dataclass(frozen=True)
class Function:
    name: str
    parameters: dict[str, Any]


def _bad_tools(message: str) -> APIError:
    return APIError(400, message, param="tools")


def parse_tools(tools: list[dict[str, Any]] | None) -> tuple[Function, ...]:
    """OpenAI's tools list (type 'function' only), checked."""
    out = []
    for i, tool in enumerate(tools or []):
        if tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise _bad_tools(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}.")
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise _bad_tools(
                f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-', got {name!r}."
            )
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise _bad_tools(f"tools[{i}].function.parameters must be a JSON Schema object.")
        out.append(Function(name, params))
    names = [f.name for f in out]
    if len(set(names)) != len(names):
        raise _bad_tools("tool names must be unique.")
    return tuple(out)


@dataclass(frozen=True)
class ToolPlan:
    """One request's tools and tool_choice, and how its output is read."""

    functions: tuple[Function, ...]
    choice: str  # none | auto | required | named
    named: str | None = None
    parallel: bool = True
    format: str = "none"  # the model family's format, for `auto`

    @classmethod
    def from_request(
        cls, tools: list[dict[str, Any]] | None, tool_choice: Any, parallel: bool | None, fmt: str
    ) -> ToolPlan:
        functions = parse_tools(tools)
        named = None
        if tool_choice is None:
            choice = "auto" if functions else "none"
        elif tool_choice in ("none", "auto", "required"):
            choice = tool_choice
        elif (
            isinstance(tool_choice, dict)
            and tool_choice.get("type") == "function"
            and isinstance(tool_choice.get("function"), dict)
            and isinstance(tool_choice["function"].get("name"), str)
        ):
            choice, named = "named", tool_choice["function"]["name"]
        else:
            raise APIError(
                400,
                "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                "{'name': NAME}}.",
                param="tool_choice",
            )
        if choice in ("required", "named") and not functions:
            raise APIError(400, f"tool_choice {tool_choice!r} needs tools.", param="tool_choice")
        if named is not None and named not in {f.name for f in functions}:
            raise APIError(400, f"tool_choice names {named!r}, which is not in tools.", param="tool_choice")
        return cls(functions, choice, named, True if parallel is None else parallel, fmt)

    @property
    def shown(self) -> bool:
        """Whether the chat template is shown the tools."""
        return self.choice != "none" and bool(self.functions)

    @property
    def reads_calls(self) -> bool:
        return self.shown and (self.choice != "auto" or self.format != "none")

    def schema(self) -> dict[str, Any] | None:
        """The JSON Schema the output must follow (`required` and named choices), else None."""
        if self.choice == "named":
            return next(f.parameters for f in self.functions if f.name == self.named)
        if self.choice != "required":
            return None
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": f.name}, "parameters": f.parameters},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for f in self.functions
        ]
        array: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
        if not self.parallel:
            array["maxItems"] = 1
        return array

    def reader(self) -> CallReader:
        if not self.reads_calls:
            return CallReader(self.parallel)
        if self.choice == "named":
            return NamedReader(self.parallel, name=self.named or "")
        if self.choice == "required":
            return ArrayReader(self.parallel)
        return HermesReader(self.parallel) if self.format == "hermes" else LlamaJsonReader(self.parallel)


def _call(obj: Any) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of a parsed call object ({"name", "arguments" or "parameters": {...}}), or
    None when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return (obj["name"], json.dumps(args, ensure_ascii=False)) if isinstance(args, dict) else None


@dataclass
class CallReader:
    """Reads one choice's output. `feed` takes the next piece of text and returns the deltas it completes
    (OpenAI's chat delta dicts); `finish` returns the last ones. This base reader passes text through."""

    parallel: bool = True
    content: list[str] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's tool_calls entries, arguments whole

    def feed(self, text: str) -> list[dict[str, Any]]:
        return self._content(text)

    def finish(self) -> list[dict[str, Any]]:
        return []

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if self.calls and reason == "stop" else reason

    def message_content(self) -> str | None:
        text = "".join(self.content)
        return None if self.calls and not text else text

    def _content(self, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        self.content.append(text)
        return [{"content": text}]

    def _start(self, name: str, arguments: str) -> list[dict[str, Any]]:
        """A new call (the whole of it, or its start when arguments stream on); [] past the first when parallel
        calls are off."""
        if self.calls and not self.parallel:
            return []
        index = len(self.calls)
        call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name}}
        self.calls.append({**call, "function": {"name": name, "arguments": arguments}})
        return [
            {"tool_calls": [{"index": index, **call, "function": {"name": name, "arguments": arguments}}]}
        ]


@dataclass
class _Held(CallReader):
    """Content passes through, except whitespace at its end (held until more content follows it: the text
    before a call ends at the call, and whitespace between or after calls is not content)."""

    _held: str = ""

    def _content(self, text: str) -> list[dict[str, Any]]:
        text = self._held + text
        body = text.rstrip()
        self._held = text[len(body) :]
        if self.calls and not body:
            return []
        return super()._content(body)

    def _drop_held(self) -> None:
        self._held = ""


@dataclass
class HermesReader(_Held):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number, content around them."""

    _buffer: str = ""
    _in_call: bool = False

    def feed(self, text: str) -> list[dict[str, Any]]:
        self._buffer += text
        out: list[dict[str, Any]] = []
        while True:
            if self._in_call:
                end = self._buffer.find(HERMES_END)
                if end < 0:
                    return out
                out += self._close(self._buffer[:end], HERMES_END)
                self._buffer = self._buffer[end + len(HERMES_END) :]
                continue
            start = self._buffer.find(HERMES_START)
            if start < 0:
                keep = _partial_suffix(self._buffer, HERMES_START)
                out += self._content(self._buffer[: len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep :]
                return out
            out += self._content(self._buffer[:start])
            self._buffer = self._buffer[start + len(HERMES_START) :]
            self._in_call = True

    def finish(self) -> list[dict[str, Any]]:
        out = self._close(self._buffer, "") if self._in_call else self._content(self._buffer)
        self._buffer = ""
        return out

    def _close(self, body: str, end: str) -> list[dict[str, Any]]:
        self._in_call = False
        try:
            call = _call(json.loads(body))
        except json.JSONDecodeError:
            call = None
        if call is None:  # not a call after all: the model's text, as written
            return self._content(HERMES_START + body + end)
        self._drop_held()
        return self._start(*call)


@dataclass
class LlamaJsonReader(_Held):
    """Llama 3.x: the whole answer is one call `{"name": ..., "parameters": {...}}` (or several, `;`-separated),
    possibly after `<|python_tag|>`; any other answer is content. Decided by the answer's first characters."""

    _buffer: str = ""
    _mode: str = "undecided"  # undecided | calls | content

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self._mode == "content":
            return self._content(text)
        self._buffer += text
        if self._mode == "undecided":
            head = self._buffer.lstrip()
            if not head or PYTHON_TAG.startswith(head):
                return []
            if head.startswith(("{", PYTHON_TAG)):
                self._mode = "calls"
            else:
                self._mode = "content"
                text, self._buffer = self._buffer, ""
                return self._content(text)
        return []

    def finish(self) -> list[dict[str, Any]]:
        text, self._buffer = self._buffer, ""
        if self._mode != "calls":
            return self._content(text)
        calls = _json_sequence(text.strip().removeprefix(PYTHON_TAG))
        if calls is None:
            return self._content(text)
        return [d for name, args in calls for d in self._start(name, args)]


@dataclass
class ArrayReader(CallReader):
    """tool_choice 'required': the output is a JSON array of {"name", "parameters"} (the grammar's)."""

    _buffer: str = ""

    def feed(self, text: str) -> list[dict[str, Any]]:
        self._buffer += text
        return []

    def finish(self) -> list[dict[str, Any]]:
        try:
            items = json.loads(self._buffer)
        except json.JSONDecodeError:
            items = None
        calls = [_call(item) for item in items] if isinstance(items, list) and items else [None]
        if any(c is None for c in calls):  # cut short (max_tokens): the text as written
            return self._content(self._buffer)
        return [d for name, args in filter(None, calls) for d in self._start(name, args)]


@dataclass
class NamedReader(CallReader):
    """A named tool_choice: the output is that function's arguments, streamed as they come."""

    name: str = ""

    def feed(self, text: str) -> list[dict[str, Any]]:
        if not self.calls:
            return self._start(self.name, text)
        if not text:
            return []
        self.calls[0]["function"]["arguments"] += text
        return [{"tool_calls": [{"index": 0, "function": {"arguments": text}}]}]

    def finish(self) -> list[dict[str, Any]]:
        return [] if self.calls else self._start(self.name, "")


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of text that begins tag (held back: the tag may be arriving)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def _json_sequence(text: str) -> list[tuple[str, str]] | None:
    """Calls in `{...}; {...}` form, or None when the text is not wholly that."""
    decoder = json.JSONDecoder()
    calls, pos = [], 0
    while pos < len(text):
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        call = _call(obj)
        if call is None:
            return None
        calls.append(call)
        while pos < len(text) and text[pos] in " \t\r\n;":
            pos += 1
    return calls or None


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: an assistant's tool call arguments as an object (OpenAI sends
    JSON text; templates write them with `tojson`), when they parse as one."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            m = {**m, "tool_calls": [_object_arguments(c) for c in calls]}
        out.append(m)
    return out


def _object_arguments(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        args = json.loads(fn["arguments"])
    except json.JSONDecodeError:
        return call
    return {**call, "function": {**fn, "arguments": args}} if isinstance(args, dict) else call
