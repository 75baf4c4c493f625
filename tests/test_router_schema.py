"""Schemathesis over the router's own OpenAPI schema, against a real router in front of a real colocated worker.

Generated bodies carry the served model's name, so they get past the model check and reach the worker. Whatever
is sent, the answer is never a 5xx and never a hang; every error is a 4xx in OpenAI's format with a message.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.schemas import OpenApiSchema

from tests.cluster import Cluster, start_cluster

# Small, so that a generated max_tokens is mostly refused at once and an accepted one generates little.
MAX_MODEL_LEN = 48
REQUEST_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def cluster(llama_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = start_cluster(
        llama_checkpoint,
        tmp_path_factory.mktemp("schema-logs"),
        mode="colocated",
        worker_args=("--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "8"),
    )
    yield cluster
    router = cluster.of_role("router")[0]
    alive = router.alive()
    cluster.stop()
    assert alive, f"the router died:\n{router.tail(60)}"
    assert "Traceback" not in router.log.read_text(errors="replace"), router.tail(60)


@pytest.fixture(scope="module")
def api_schema(cluster: Cluster) -> OpenApiSchema:
    # whole streams are read (schemathesis stops after 20 events by default), so that their ends are checked;
    # a request may hold many prompts, each of up to MAX_MODEL_LEN events
    config = schemathesis.Config.from_dict({"max-stream-events": 1_000_000})
    schema = schemathesis.openapi.from_url(f"{cluster.url}/openapi.json", config=config)
    return schema.exclude(path="/metrics")  # Prometheus text, not JSON


def check_answer(case: schemathesis.Case, response: schemathesis.Response, cluster: Cluster) -> None:
    where = f"{case.as_curl_command()}\n-> {response.status_code} {response.text[:500]}"
    if response.status_code >= 500:
        router = cluster.of_role("router")[0]
        pytest.fail(f"server error for\n{where}\nrouter log:\n{router.tail(40)}")
    if response.status_code >= 400:
        body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        assert isinstance(error, dict), where
        assert isinstance(error.get("message"), str) and error["message"], where
        assert error.get("type"), where
        return
    if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", f"the stream did not end with [DONE]:\n{where}"
        # NOTE: parameters are all checked before the first byte is sent: an error inside the stream is a failure
        assert not any("error" in json.loads(e) for e in events[:-1]), where
    else:
        assert isinstance(response.json(), dict), where


# Every operation the router documents; the test fails when the schema's list changes, so that a new one gets
# fuzzed too (or is excluded above, with a reason).
OPERATIONS = [
    ("GET", "/health"),
    ("GET", "/v1/models"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
]
# (mode, method, path, examples); an operation without parameters has no negative cases
RUNS = [
    *((GenerationMode.POSITIVE, method, path, 5) for method, path in OPERATIONS if method == "GET"),
    *(
        (mode, method, path, examples)
        for method, path in OPERATIONS
        if method == "POST"
        for mode, examples in ((GenerationMode.POSITIVE, 150), (GenerationMode.NEGATIVE, 100))
    ),
]


def test_the_schema_lists_the_fuzzed_operations(api_schema: OpenApiSchema) -> None:
    listed = {(op.method.upper(), op.path) for op in (r.ok() for r in api_schema.get_all_operations())}
    assert listed == set(OPERATIONS)


# NOTE: one Hypothesis run per operation and mode through `as_strategy`: schemathesis' lazy pytest loader
# (`schemathesis.pytest.from_fixture`), the way to fuzz a server a fixture starts, sets `Node._nodeid`, which pytest 9
# no longer has
@pytest.mark.parametrize(("mode", "method", "path", "examples"), RUNS, ids=lambda v: getattr(v, "value", v))
def test_no_request_gets_a_server_error(
    api_schema: OpenApiSchema,
    cluster: Cluster,
    llama_checkpoint: Path,
    mode: GenerationMode,
    method: str,
    path: str,
    examples: int,
) -> None:
    statuses: Counter[int] = Counter()

    @given(case=api_schema[path][method].as_strategy(mode))
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate, Phase.shrink],
    )
    def fuzz(case: schemathesis.Case) -> None:
        if isinstance(case.body, dict):
            case.body["model"] = llama_checkpoint.name
        try:
            response = case.call(timeout=REQUEST_TIMEOUT_S)
        except requests.Timeout:
            pytest.fail(f"no answer in {REQUEST_TIMEOUT_S:.0f}s to\n{case.as_curl_command()}")
        statuses[response.status_code] += 1
        check_answer(case, response, cluster)
        case.validate_response(response, checks=[not_a_server_error])

    fuzz()
    print(f"{mode.value} {method} {path}: {dict(statuses)}")
    assert 404 not in statuses, "every body names the served model"
    if mode == GenerationMode.POSITIVE:
        assert statuses[200] > 0, f"no request reached the worker: {dict(statuses)}"


# What schemathesis does not generate on its own: integers past 64 bits, lone surrogates (valid JSON escapes that
# are not Unicode), NUL bytes, NaN and infinities (Python's JSON parser takes them), floats that a float32 field
# rounds to 0, names that collide with the chat template's own arguments. (endpoint, body, expected status)
PROMPT = {"prompt": "hi", "max_tokens": 2}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
EDGE_CASES: list[tuple[str, dict[str, Any] | bytes, int]] = [
    ("completions", {**PROMPT, "seed": 2**70}, 400),
    ("completions", {**PROMPT, "seed": -(2**63)}, 200),
    ("completions", {**PROMPT, "stop_token_ids": [2**40]}, 400),
    ("completions", {**PROMPT, "stop_token_ids": [-1]}, 400),
    ("completions", {**PROMPT, "top_k": 2**70}, 400),
    ("completions", {**PROMPT, "top_k": 10**6}, 200),
    ("completions", {**PROMPT, "logprobs": 2**70}, 400),
    ("completions", {**PROMPT, "n": 2**70}, 400),
    ("completions", {**PROMPT, "best_of": 2**70}, 400),
    ("completions", {"prompt": "hi", "max_tokens": 2**70}, 400),
    ("completions", {"prompt": [2**70]}, 400),
    ("completions", {"prompt": [[5], [2**70]]}, 400),
    ("completions", {**PROMPT, "top_p": 1e-300}, 200),
    ("completions", {**PROMPT, "temperature": 1e-300}, 200),
    ("completions", {**PROMPT, "min_p": 1e300}, 400),
    ("completions", {**PROMPT, "presence_penalty": -1e-300}, 200),
    ("completions", {**PROMPT, "stop": ["\x00"]}, 200),
    ("completions", {"prompt": "a\x00b", "max_tokens": 2}, 200),
    ("completions", {**PROMPT, "min_p": float("nan")}, 400),
    ("completions", {**PROMPT, "temperature": float("nan")}, 400),
    ("completions", {**PROMPT, "top_p": float("inf")}, 400),
    ("completions", b'{"model": "MODEL", "prompt": "\\ud800", "max_tokens": 2}', 400),
    ("completions", b'{"model": "MODEL", "prompt": ["a", "\\udfff"], "max_tokens": 2}', 400),
    ("completions", b'{"model": "MODEL", "prompt": "hi", "stop": ["\\ud800"], "max_tokens": 2}', 400),
    ("completions", b'{"model": "MODEL", "prompt": "hi", "user": "\\ud800", "max_tokens": 2}', 400),
    ("completions", b'{"model": "MODEL\\ud800", "prompt": "hi"}', 400),
    ("completions", b'{"model": "MODEL", "prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}", 400),
    ("chat/completions", b'{"model": "MODEL", "messages": [{"role": "user", "content": "\\ud800"}]}', 400),
    (
        "chat/completions",
        b'{"model": "MODEL", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
        400,
    ),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400),
    ("chat/completions", {**CHAT, "chat_template_kwargs": {"messages": []}}, 400),
    ("chat/completions", {**CHAT, "chat_template_kwargs": {"add_generation_prompt": False}}, 400),
    ("chat/completions", {**CHAT, "chat_template_kwargs": {"tools": []}}, 400),
    ("chat/completions", {**CHAT, "chat_template_kwargs": {"bos_token": "x"}}, 400),
    ("chat/completions", {**CHAT, "chat_template_kwargs": {"self": 1}}, 400),
    ("chat/completions", {**CHAT, "chat_template_kwargs": {"enable_thinking": False}}, 200),
    (
        "chat/completions",
        {
            "messages": [
                {"role": "assistant", "content": "x", "tool_calls": 5},
                {"role": "user", "content": "y"},
            ]
        },
        400,
    ),
    ("chat/completions", {**CHAT, "max_completion_tokens": 2**70}, 400),
    ("chat/completions", {**CHAT, "top_logprobs": 2**70, "logprobs": True}, 400),
]


def _edge_id(value: object) -> str | None:
    if not isinstance(value, dict):
        return None
    base = PROMPT | CHAT
    return json.dumps({k: v for k, v in value.items() if base.get(k) != v} or value)[:60]


@pytest.mark.parametrize(("endpoint", "payload", "status"), EDGE_CASES, ids=_edge_id)
def test_edge_values_get_a_4xx_or_an_answer(
    cluster: Cluster, llama_checkpoint: Path, endpoint: str, payload: dict[str, Any] | bytes, status: int
) -> None:
    model = llama_checkpoint.name
    content = (
        payload.replace(b"MODEL", model.encode())
        if isinstance(payload, bytes)
        else json.dumps({"model": model, **payload}).encode()
    )
    r = httpx.post(
        f"{cluster.url}/v1/{endpoint}",
        content=content,
        headers={"content-type": "application/json"},
        timeout=REQUEST_TIMEOUT_S,
    )
    assert r.status_code == status, f"{content[:200]!r} -> {r.status_code} {r.text}"
    if status >= 400:
        assert r.json()["error"]["message"], r.text


def test_a_vanishing_temperature_samples_greedily(cluster: Cluster, llama_checkpoint: Path) -> None:
    """A temperature that float32 still holds (1e-40) but that logits cannot be divided by without overflowing."""

    def tokens(temperature: float) -> list[int]:
        body = {"model": llama_checkpoint.name, "prompt": "hello there", "max_tokens": 8, "ignore_eos": True}
        body |= {"temperature": temperature, "return_token_ids": True}
        r = httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    greedy = tokens(0.0)
    assert tokens(1e-40) == tokens(1e-6) == greedy
