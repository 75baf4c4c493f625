"""Reading tool calls from a model's output (services/router/tool_calls.py), without processes: every way of
splitting a text into streamed pieces reads the same content and calls as the whole text."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from services.router.errors import APIError
from services.router.tool_calls import ToolPlan, detect_format, template_messages

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def plan(fmt: str, choice: Any = None, parallel: bool | None = None) -> ToolPlan:
    return ToolPlan.from_request([WEATHER, TIME], choice, parallel, fmt)


def read(p: ToolPlan, pieces: list[str]) -> tuple[str | None, list[tuple[str, dict]], list[dict]]:
    """(message content, [(name, arguments)], deltas) after feeding the pieces; the deltas are checked to add up
    to the same content and calls, as a client accumulating them would."""
    reader = p.reader()
    deltas = [d for piece in pieces for d in reader.feed(piece)] + reader.finish()
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in reader.calls]
    streamed_content = "".join(d.get("content", "") for d in deltas)
    assert streamed_content == (reader.message_content() or "")
    acc: dict[int, dict[str, str]] = {}
    for d in deltas:
        for c in d.get("tool_calls", []):
            slot = acc.setdefault(c["index"], {"id": "", "name": "", "arguments": ""})
            slot["id"] += c.get("id", "")
            slot["name"] += c.get("function", {}).get("name", "")
            slot["arguments"] += c["function"].get("arguments", "")
    assert [(a["name"], json.loads(a["arguments"])) for _, a in sorted(acc.items())] == calls
    assert [a["id"] for _, a in sorted(acc.items())] == [c["id"] for c in reader.calls]
    return reader.message_content(), calls, deltas


def splits(text: str, parts: int) -> list[list[str]]:
    """Every way to cut text into `parts` pieces (some empty)."""
    out = []
    for cuts in itertools.combinations_with_replacement(range(len(text) + 1), parts - 1):
        bounds = [0, *cuts, len(text)]
        out.append([text[a:b] for a, b in itertools.pairwise(bounds)])
    return out


HERMES = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'
)
HERMES_CALLS = [("get_weather", {"city": "Paris"}), ("get_time", {})]


def test_hermes_reads_the_same_calls_from_any_pieces() -> None:
    whole = read(plan("hermes"), [HERMES])
    assert whole[:2] == ("Let me check.", HERMES_CALLS)
    for pieces in splits(HERMES, 2) + splits(HERMES, 3)[::7]:
        assert read(plan("hermes"), pieces)[:2] == whole[:2], pieces


def test_hermes_content_calls_and_what_is_not_a_call() -> None:
    assert read(plan("hermes"), ["Just text, no call. "])[:2] == ("Just text, no call.", [])
    only = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    assert read(plan("hermes"), [only])[:2] == (None, [("get_time", {})])
    broken = "Hm <tool_call>{not json}</tool_call> ok"  # given back as written
    assert read(plan("hermes"), [broken])[:2] == (broken, [])
    cut = 'A <tool_call>{"name": "get_time", "arguments": {}}'  # the stream ended before the closing tag
    assert read(plan("hermes"), [cut])[:2] == ("A", [("get_time", {})])
    cut_short = 'A <tool_call>{"name": "get_ti'
    assert read(plan("hermes"), [cut_short])[:2] == (cut_short, [])
    lone = "a < b and <tool_ is not a tag"
    assert read(plan("hermes"), list(lone))[:2] == (lone, [])
    parameters = '<tool_call>{"name": "get_weather", "parameters": {"city": "Oslo"}}</tool_call>'
    assert read(plan("hermes"), [parameters])[1] == [("get_weather", {"city": "Oslo"})]


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    content, calls, _ = read(plan("hermes", parallel=False), [HERMES])
    assert (content, calls) == ("Let me check.", HERMES_CALLS[:1])


def test_finish_reason_is_tool_calls_only_when_a_call_was_read_and_the_model_stopped() -> None:
    reader = plan("hermes").reader()
    reader.feed(HERMES)
    reader.finish()
    assert reader.finish_reason("stop") == "tool_calls" and reader.finish_reason("length") == "length"
    text = plan("hermes").reader()
    text.feed("plain")
    assert text.finish_reason("stop") == "stop"


LLAMA = '{"name": "get_weather", "parameters": {"city": "Paris"}}'


def test_llama3_json_calls_and_content() -> None:
    whole = read(plan("llama3_json"), [LLAMA])
    assert whole[:2] == (None, [("get_weather", {"city": "Paris"})])
    for pieces in splits(LLAMA, 2):
        assert read(plan("llama3_json"), pieces)[:2] == whole[:2]
    two = f'<|python_tag|>{LLAMA}; {{"name": "get_time", "parameters": {{}}}}'
    assert read(plan("llama3_json"), [two])[1] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert read(plan("llama3_json"), ["  ", "The weather ", "is fine. "])[:2] == (
        "  The weather is fine.",
        [],
    )
    not_a_call = '{"answer": 42}'
    assert read(plan("llama3_json"), [not_a_call])[:2] == (not_a_call, [])
    assert read(plan("llama3_json"), ["<|py", "thon_tag|>", LLAMA])[1] == [("get_weather", {"city": "Paris"})]


def test_required_and_named_choices_read_the_constrained_output() -> None:
    required = plan("none", "required")
    schema = required.schema()
    assert schema is not None and schema["type"] == "array" and "maxItems" not in schema
    assert plan("none", "required", parallel=False).schema()["maxItems"] == 1  # type: ignore[index]
    array = (
        '[{"name": "get_weather", "parameters": {"city": "Rome"}}, {"name": "get_time", "parameters": {}}]'
    )
    assert read(required, [array[:10], array[10:]])[:2] == (
        None,
        [("get_weather", {"city": "Rome"}), ("get_time", {})],
    )
    assert read(required, [array[:30]])[:2] == (array[:30], [])  # cut short: the text as written
    named = plan("none", {"type": "function", "function": {"name": "get_weather"}})
    assert named.schema() == WEATHER["function"]["parameters"]  # type: ignore[index]
    content, calls, deltas = read(named, ['{"city": ', '"Rome"}'])
    assert (content, calls) == (None, [("get_weather", {"city": "Rome"})])
    assert len(deltas) == 2 and deltas[0]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_no_tools_or_choice_none_read_plain_text() -> None:
    for p in (
        ToolPlan.from_request(None, None, None, "hermes"),
        plan("hermes", "none"),
        plan("none", "auto"),
    ):
        assert not p.reads_calls
        assert read(p, [HERMES])[:2] == (HERMES, [])
    assert not plan("hermes", "none").shown and plan("none", "auto").shown


@pytest.mark.parametrize(
    ("tools", "choice", "match"),
    [
        ([{"type": "function"}], None, "tools\\[0\\]"),
        ([{"type": "function", "function": {"name": "has space"}}], None, "letters"),
        ([WEATHER, WEATHER], None, "unique"),
        ([{"type": "function", "function": {"name": "f", "parameters": []}}], None, "JSON Schema"),
        (None, "required", "needs tools"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "not in tools"),
        ([WEATHER], "sometimes", "tool_choice must be"),
    ],
)
def test_bad_tools_and_tool_choice_are_400s(tools: Any, choice: Any, match: str) -> None:
    with pytest.raises(APIError, match=match) as e:
        ToolPlan.from_request(tools, choice, None, "hermes")
    assert e.value.status == 400


def test_the_format_is_detected_from_the_chat_template() -> None:
    assert detect_format("... <tool_call>\n{{ tool | tojson }} ...") == "hermes"
    assert detect_format("<|start_header_id|>ipython ... <|python_tag|>") == "llama3_json"
    assert detect_format("<|start_header_id|>{{ role }} ... 'parameters': ...") == "llama3_json"
    assert detect_format("{{ message['content'] }}") == "none" and detect_format(None) == "none"


def test_templates_get_tool_call_arguments_as_objects() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    odd = {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "not json"}}
    messages = [
        {"role": "assistant", "content": "", "tool_calls": [call, odd]},
        {"role": "user", "content": "x"},
    ]
    out = template_messages(messages)
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert out[0]["tool_calls"][1] == odd and out[1] == messages[1]
    assert call["function"]["arguments"] == '{"a": 1}'  # the request's own message is not changed
