"""Tool calls end to end with real processes and the official `openai` client: a scripted checkpoint (it answers
with a tool call, as a tool-calling model would) served disaggregated and colocated, each behind two routers whose
chat templates are of the two supported families (Qwen's `<tool_call>` and Llama 3.x's JSON).

Oracles: `transformers` (the checkpoint writes its script there too; the prompts' token counts come from its
`apply_chat_template`) and the script itself (the calls it holds)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.cluster import Cluster, start_cluster
from tests.scripted_model import SCRIPTS, make_scripted_model
from tests.test_models_vs_transformers import hf_generate

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
        },
    },
]
# what each family's script says: (content, calls)
EXPECTED = {
    "hermes": ("Let me check.", [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]),
    "llama3_json": (None, [("get_weather", {"city": "Paris"})]),
}
QUESTION = [{"role": "user", "content": "What is the weather in Paris, and the time?"}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_scripted_model(tmp_path_factory.mktemp("scripted"))


@pytest.fixture(scope="module", params=["pd", "colocated"])
def urls(request: pytest.FixtureRequest, folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """{family: router URL} in front of one cluster."""
    cluster: Cluster = start_cluster(folders["hermes"], tmp_path_factory.mktemp("tools"), mode=request.param)
    try:
        out = {"hermes": cluster.url}
        cluster.router(model=folders["llama3_json"])
        cluster.wait_ready()
        out["llama3_json"] = cluster.url
        yield out
    finally:
        cluster.stop()


def client_for(urls: dict[str, str], family: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{urls[family]}/v1", api_key="unused")


def model_of(folders: dict[str, Path], family: str) -> str:
    return folders[family].name


def calls_of(message: Any) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def chat_ids(folder: Path, messages: list[dict], tools: list[dict] | None) -> list[int]:
    tok = AutoTokenizer.from_pretrained(folder)
    return list(tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, return_dict=False))


def prompt_tokens(folder: Path, messages: list[dict], tools: list[dict] | None) -> int:
    return len(chat_ids(folder, messages, tools))


@pytest.mark.parametrize("family", list(SCRIPTS))
def test_the_scripted_model_writes_its_script_in_transformers(folders: dict[str, Path], family: str) -> None:
    tok = AutoTokenizer.from_pretrained(folders[family])
    prompt = chat_ids(folders[family], QUESTION, TOOLS)
    hf = AutoModelForCausalLM.from_pretrained(folders["hermes"], dtype=torch.float32).eval()
    _, _, script, end = SCRIPTS[family]
    want = [tok.convert_tokens_to_ids(p) for p in script] + [tok.convert_tokens_to_ids(end)]
    assert hf_generate(hf, prompt, len(want))[0] == want


@pytest.mark.parametrize("family", list(SCRIPTS))
def test_tool_calls_through_the_openai_client(
    urls: dict[str, str], folders: dict[str, Path], family: str
) -> None:
    client = client_for(urls, family)
    args = dict(model=model_of(folders, family), messages=QUESTION, tools=TOOLS, temperature=0, max_tokens=20)
    content, calls = EXPECTED[family]

    out = client.chat.completions.create(**args)
    choice = out.choices[0]
    assert (choice.message.content, calls_of(choice.message)) == (content, calls)
    assert choice.finish_reason == "tool_calls"
    ids = [c.id for c in choice.message.tool_calls]
    assert all(i.startswith("call_") for i in ids) and len(set(ids)) == len(ids)
    assert out.usage.prompt_tokens == prompt_tokens(folders[family], QUESTION, TOOLS)

    # streamed: the deltas add up to the same message, through the client's typed chunks
    text, acc, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **args):
        for c in chunk.choices:
            text += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                slot = acc.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = slot["id"] or d.id
                slot["name"] += (d.function.name or "") if d.function else ""
                slot["arguments"] += (d.function.arguments or "") if d.function else ""
            finish = c.finish_reason or finish
    assert (text or None) == content and finish == "tool_calls"
    assert [(s["name"], json.loads(s["arguments"])) for _, s in sorted(acc.items())] == calls
    assert all(s["id"].startswith("call_") for s in acc.values())

    # logprobs and token ids are not lost while a call is held back: one entry per generated token
    lps, token_ids = [], []
    for chunk in client.chat.completions.create(
        stream=True, logprobs=True, extra_body={"return_token_ids": True}, **args
    ):
        for c in chunk.choices:
            lps += c.logprobs.content if c.logprobs and c.logprobs.content else []
            token_ids += (c.model_extra or {}).get("token_ids") or []
    assert len(lps) == len(token_ids) == out.usage.completion_tokens

    one = client.chat.completions.create(parallel_tool_calls=False, **args).choices[0]
    assert calls_of(one.message) == calls[:1]

    # tool_choice none: no tools in the prompt, the script comes back as text
    plain = client.chat.completions.create(**{**args, "tool_choice": "none"})
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason == "stop"
    assert '"get_weather"' in plain.choices[0].message.content
    assert plain.usage.prompt_tokens == prompt_tokens(folders[family], QUESTION, None)

    # the calls go back with their results; the template writes them as the model's own format
    history = [
        *QUESTION,
        choice.message.model_dump(exclude_none=True),
        *({"role": "tool", "tool_call_id": c.id, "content": "18 C"} for c in choice.message.tool_calls),
    ]
    again = client.chat.completions.create(**{**args, "messages": history})
    for m in history:
        for c in m.get("tool_calls", []):
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    assert again.usage.prompt_tokens == prompt_tokens(folders[family], history, TOOLS)
    assert calls_of(again.choices[0].message) == calls
