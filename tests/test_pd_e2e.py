"""End to end with real processes: HTTP -> router -> prefill -> Mooncake TCP -> decode -> SSE.

One disaggregated cluster (prefill chunks of 32 tokens, KV checksums on) and one colocated cluster serve the same
tiny checkpoint; `transformers` is the oracle.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from services.common.tokenizer import Tokenizer
from tests.cluster import Cluster, load, random_prompts, start_cluster, stream_completion, wait_until
from tests.test_models_vs_transformers import hf_generate

CHUNK = 32
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def pd(llama_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = start_cluster(
        llama_checkpoint,
        tmp_path_factory.mktemp("pd-logs"),
        worker_args=("--max-num-batched-tokens", str(CHUNK)),
        router_args=("--kv-checksum",),
    )
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def colocated(llama_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = start_cluster(
        llama_checkpoint,
        tmp_path_factory.mktemp("co-logs"),
        mode="colocated",
        worker_args=("--max-num-batched-tokens", str(CHUNK)),
    )
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def hf(llama_checkpoint: Path):
    return AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()


def model_name(path: Path) -> str:
    return path.name


def complete(url: str, model: str, prompt: list[int], max_tokens: int) -> list[int]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_pd_equals_colocated_equals_transformers(pd: Cluster, colocated: Cluster, hf, llama_checkpoint: Path):
    model = model_name(llama_checkpoint)
    prompts = random_prompts(1, [5, 45, 100, 151])  # up to 5 prefill chunks of 32
    decode = pd.of_role("decode")[0].address
    prefill = pd.of_role("prefill")[0].address
    before_decode, before_prefill = load(decode), load(prefill)
    for prompt in prompts:
        tokens, text, usage = stream_completion(pd.url, model, prompt, MAX_TOKENS)
        assert tokens == complete(colocated.url, model, prompt, MAX_TOKENS)
        assert tokens == hf_generate(hf, prompt, MAX_TOKENS)[0]
        assert text == Tokenizer(llama_checkpoint).decode(tokens)
        assert usage["usage"]["prompt_tokens"] == len(prompt)
        assert usage["usage"]["completion_tokens"] == MAX_TOKENS
        t = usage["timings"]
        assert t["prefill_ms"] > 0 and t["transfer_ms"] >= 0 and t["first_decode_ms"] > 0

    # the KV really moved: the decode worker ran no prompt position, only each generated token but the last,
    # and the prefill worker sent every prompt block (the checksums were verified on every request)
    after_decode, after_prefill = load(decode), load(prefill)
    assert after_decode.computed_prompt_tokens == before_decode.computed_prompt_tokens == 0
    assert after_decode.computed_tokens - before_decode.computed_tokens == len(prompts) * (MAX_TOKENS - 1)
    cfg = json.loads((llama_checkpoint / "config.json").read_text())
    block_nbytes = (
        cfg["num_hidden_layers"] * 2 * 16 * cfg["num_key_value_heads"] * cfg["head_dim"] * 4
    )  # fp32
    blocks = sum(-(-len(p) // 16) for p in prompts)
    assert after_prefill.transferred_bytes - before_prefill.transferred_bytes == blocks * block_nbytes
    assert after_prefill.computed_prompt_tokens - before_prefill.computed_prompt_tokens == sum(
        map(len, prompts)
    )


def test_openai_client_chat_and_completions(pd: Cluster, llama_checkpoint: Path) -> None:
    client = openai.OpenAI(base_url=f"{pd.url}/v1", api_key="unused")
    model = model_name(llama_checkpoint)
    tok = Tokenizer(llama_checkpoint)
    assert [m.id for m in client.models.list().data] == [model]

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there, who are you?"},
    ]
    prompt_tokens = len(tok.encode_chat(messages))
    chat = client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert chat.usage.prompt_tokens == prompt_tokens
    assert chat.usage.completion_tokens == 12 and chat.usage.total_tokens == prompt_tokens + 12
    assert chat.choices[0].finish_reason == "length" and chat.choices[0].message.role == "assistant"

    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == prompt_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "length"
    ]

    text = client.completions.create(
        model=model,
        prompt="The quick brown fox",
        max_tokens=9,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert text.usage.prompt_tokens == len(tok.encode("The quick brown fox"))
    assert text.usage.completion_tokens == 9
    pieces = client.completions.create(
        model=model,
        prompt="The quick brown fox",
        max_tokens=9,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(p.choices[0].text for p in pieces) == text.choices[0].text

    lp = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = lp.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)


def test_logit_bias_through_the_openai_client(
    pd: Cluster, colocated: Cluster, hf, llama_checkpoint: Path
) -> None:
    """Disaggregated (the prefill worker samples the first token under the bias) and colocated: a ban on the
    greedy token and a boost elsewhere give `transformers`' tokens under the same biases (`sequence_bias`); +100
    forces a token in every sampled draw, streamed too."""
    model = model_name(llama_checkpoint)
    prompt = Tokenizer(llama_checkpoint).encode("The quick brown fox")
    free = complete(pd.url, model, prompt, 6)
    bias = {free[0]: -100.0, free[2]: 5.0}
    want = hf_generate(hf, prompt, 6, sequence_bias={(t,): b for t, b in bias.items()})[0]
    assert want[0] != free[0]
    for cluster in (pd, colocated):
        client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused")
        out = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=6,
            temperature=0,
            logit_bias={str(t): b for t, b in bias.items()},
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        assert out.choices[0].token_ids == want
        forced = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=5,
            temperature=1.0,
            seed=4,
            logit_bias={"42": 100},
            stream=True,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        assert [t for chunk in forced for t in chunk.choices[0].token_ids] == [42] * 5


def computed_prompt_tokens(cluster: Cluster) -> int:
    return sum(
        load(p.address).computed_prompt_tokens for p in cluster.procs if p.name.split("-")[0] != "router"
    )


def test_n_choices_share_one_prefill(pd: Cluster, colocated: Cluster, llama_checkpoint: Path) -> None:
    """n=4 through the official client, disaggregated and colocated: choice j equals the single-sample output
    of seed + j (streamed or not, completions and chat), usage counts the prompt once and every choice's tokens,
    and the prompt is computed once: the other samples compute only its last, partial block."""
    model = model_name(llama_checkpoint)
    tok = Tokenizer(llama_checkpoint)
    for name, cluster in (("disaggregated", pd), ("colocated", colocated)):
        # a prompt no earlier request cached, whose last 16-token block is partial
        prompt = tok.encode(f"Once upon a time, {name}, there was a tiny model that " * 5)
        client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused")
        sample = dict(model=model, max_tokens=6, temperature=1.0, extra_body={"ignore_eos": True})
        before = computed_prompt_tokens(cluster)
        many = client.completions.create(prompt=prompt, seed=100, n=4, **sample)
        computed = computed_prompt_tokens(cluster) - before
        singles = [
            client.completions.create(prompt=prompt, seed=100 + j, **sample).choices[0].text for j in range(4)
        ]
        assert [c.index for c in many.choices] == [0, 1, 2, 3]
        assert [c.text for c in many.choices] == singles and len(set(singles)) > 1
        assert many.usage.prompt_tokens == len(prompt) and many.usage.completion_tokens == 24
        assert len(prompt) % 16 and computed == len(prompt) + 3 * (len(prompt) % 16), computed
        streamed = client.completions.create(prompt=prompt, seed=100, n=4, stream=True, **sample)
        texts = ["", "", "", ""]
        for chunk in streamed:
            for c in chunk.choices:
                texts[c.index] += c.text
        assert texts == singles

        messages = [{"role": "user", "content": "Tell me a story."}]
        chat = dict(
            model=model, messages=messages, max_tokens=5, temperature=1.0, extra_body={"ignore_eos": True}
        )
        one = [
            client.chat.completions.create(seed=7 + j, **chat).choices[0].message.content for j in range(3)
        ]
        three = client.chat.completions.create(seed=7, n=3, **chat)
        assert [c.message.content for c in three.choices] == one and [c.index for c in three.choices] == [
            0,
            1,
            2,
        ]
        assert (
            three.usage.prompt_tokens == len(tok.encode_chat(messages))
            and three.usage.completion_tokens == 15
        )
        pieces = client.chat.completions.create(seed=7, n=3, stream=True, **chat)
        contents = ["", "", ""]
        for chunk in pieces:
            for c in chunk.choices:
                contents[c.index] += c.delta.content or ""
        assert contents == one


def test_best_of_keeps_the_most_likely_samples(pd: Cluster, llama_checkpoint: Path) -> None:
    """best_of=4, n=2: the two of the seeds' four single samples with the highest mean token logprob (computed
    here from each single sample's logprobs), in seed order; usage bills all four; no logprobs unless asked."""
    client = openai.OpenAI(base_url=f"{pd.url}/v1", api_key="unused")
    model = model_name(llama_checkpoint)
    sample = dict(
        model=model, prompt="The cat", max_tokens=5, temperature=1.0, extra_body={"ignore_eos": True}
    )
    singles = [client.completions.create(seed=30 + j, logprobs=0, **sample).choices[0] for j in range(4)]
    means = [sum(c.logprobs.token_logprobs) / 5 for c in singles]
    keep = sorted(sorted(range(4), key=lambda j: -means[j])[:2])
    best = client.completions.create(seed=30, n=2, best_of=4, **sample)
    assert [c.text for c in best.choices] == [singles[j].text for j in keep]
    assert [c.index for c in best.choices] == [0, 1] and all(c.logprobs is None for c in best.choices)
    assert best.usage.completion_tokens == 20
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(seed=30, n=3, best_of=2, **sample)
    with pytest.raises(openai.BadRequestError, match="streamed"):
        client.completions.create(best_of=2, stream=True, **sample)


def test_json_schema_outputs_through_the_openai_client(
    pd: Cluster, colocated: Cluster, llama_checkpoint: Path
) -> None:
    """response_format json_schema, disaggregated (the prefill worker samples the first token under the schema,
    the decode worker continues from it) and colocated: 20 seeds' answers validate; the first 5 streamed too."""
    import jsonschema

    from tests.test_sampling import SCHEMA

    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    messages = [{"role": "user", "content": "Describe a thing as JSON."}]
    for cluster in (pd, colocated):
        client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused")
        args = dict(model=model_name(llama_checkpoint), messages=messages, max_tokens=80, temperature=1.0)
        for seed in range(20):
            out = client.chat.completions.create(seed=seed, response_format=fmt, **args)
            assert out.choices[0].finish_reason == "stop"
            jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
            if seed >= 5:
                continue
            chunks = client.chat.completions.create(seed=seed, response_format=fmt, stream=True, **args)
            streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert streamed == out.choices[0].message.content
        obj = client.chat.completions.create(
            seed=1, response_format={"type": "json_object"}, **{**args, "max_tokens": 200}
        )
        assert obj.choices[0].message.content.startswith("{")


def test_required_and_named_tool_choices_through_the_openai_client(
    pd: Cluster, colocated: Cluster, llama_checkpoint: Path
) -> None:
    """tool_choice 'required' and a named function constrain a random model's output (disaggregated and
    colocated, streamed and not): every call names an offered tool and its arguments validate against that
    tool's parameters (jsonschema). With parallel calls allowed, this random model keeps adding calls until
    max_tokens: the cut-short array comes back as content, not as broken calls."""
    import jsonschema

    from tests.test_sampling import SCHEMA

    small = {"type": "object", "properties": {"zone": {"enum": ["CET", "UTC"]}}, "required": ["zone"]}
    tools = [
        {"type": "function", "function": {"name": "describe", "parameters": SCHEMA}},
        {"type": "function", "function": {"name": "get_time", "parameters": small}},
    ]
    params = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    messages = [{"role": "user", "content": "Call a tool."}]
    named = {"type": "function", "function": {"name": "get_time"}}
    for cluster in (pd, colocated):
        client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused")
        args = dict(model=model_name(llama_checkpoint), messages=messages, tools=tools, max_tokens=120)
        one = dict(tool_choice="required", parallel_tool_calls=False, **args)
        for seed in range(3):
            out = client.chat.completions.create(seed=seed, **one).choices[0]
            assert out.finish_reason == "tool_calls" and out.message.content is None
            assert len(out.message.tool_calls) == 1, out
            call = out.message.tool_calls[0]
            jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])
            streamed = ["", ""]
            for chunk in client.chat.completions.create(seed=seed, stream=True, **one):
                for d in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
                    assert d.index == 0
                    streamed[0] += d.function.name or ""
                    streamed[1] += d.function.arguments or ""
            assert streamed == [call.function.name, call.function.arguments]

            forced = client.chat.completions.create(seed=seed, tool_choice=named, **args).choices[0]
            assert [c.function.name for c in forced.message.tool_calls] == ["get_time"]
            assert forced.finish_reason == "tool_calls" and forced.message.content is None
            jsonschema.validate(json.loads(forced.message.tool_calls[0].function.arguments), small)

            many = client.chat.completions.create(seed=seed, tool_choice="required", **args).choices[0]
            if many.finish_reason == "tool_calls":
                for call in many.message.tool_calls:
                    jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])
            else:
                assert many.finish_reason == "length" and many.message.tool_calls is None
                assert many.message.content.startswith('[{"name": "')
        with pytest.raises(openai.BadRequestError, match="response_format"):
            client.chat.completions.create(
                tool_choice="required", response_format={"type": "json_object"}, **args
            )
        with pytest.raises(openai.BadRequestError, match="not in tools"):
            client.chat.completions.create(
                tool_choice={"type": "function", "function": {"name": "nope"}}, **args
            )


def test_32_concurrent_streams_then_no_blocks_used(pd: Cluster, llama_checkpoint: Path) -> None:
    model = model_name(llama_checkpoint)
    rng = random.Random(7)
    lengths = [rng.randint(3, 120) for _ in range(32)]
    prompts = random_prompts(2, lengths)
    budgets = [rng.randint(4, 40) for _ in range(32)]

    async def one(client: httpx.AsyncClient, prompt: list[int], n: int) -> list[int]:
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": n,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "return_token_ids": True,
        }
        tokens = []
        async with client.stream("POST", f"{pd.url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    assert "error" not in event, event
                    tokens += event["choices"][0]["token_ids"]
        return tokens

    async def main() -> list[list[int]]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, p, n) for p, n in zip(prompts, budgets, strict=True)))

    results = asyncio.run(main())
    for prompt, n, tokens in zip(prompts, budgets, results, strict=True):
        assert len(tokens) == n
        assert tokens == complete(pd.url, model, prompt, n), (
            "a concurrent stream differs from the same request alone"
        )
    for proc in pd.procs[:2]:
        wait_until(lambda a=proc.address: load(a).used_blocks == 0, 10, f"{proc.name} to free every block")
        assert load(proc.address).running == 0 and load(proc.address).parked == 0


def test_client_disconnect_frees_blocks_on_both_workers(pd: Cluster, llama_checkpoint: Path) -> None:
    body = {
        "model": model_name(llama_checkpoint),
        "prompt": random_prompts(3, [90])[0],
        "max_tokens": 1500,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    decode = pd.of_role("decode")[0].address
    with httpx.stream("POST", f"{pd.url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        received = [next(lines) for _ in range(6)]
        assert load(decode).running == 1 and load(decode).used_blocks > 0
    assert any(line.startswith("data: {") for line in received)
    for proc in pd.procs[:2]:
        wait_until(
            lambda a=proc.address: load(a).used_blocks == 0 and load(a).running == 0,
            10,
            f"{proc.name} to free the disconnected request's blocks",
        )


@pytest.mark.parametrize(
    ("payload", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        ({"model": "M", "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": "M", "prompt": 12.5}, 400, "prompt"),
        ({"model": "nope", "prompt": "hi"}, 404, "does not exist"),
        ({"model": "M", "prompt": "hi", "max_tokens": -3}, 400, "at least 1"),
        ({"model": "M", "prompt": "hi", "max_tokens": 10**9}, 400, "maximum context length"),
        ({"model": "M", "prompt": [5] * 3000, "max_tokens": 4}, 400, "maximum context length"),
        ({"model": "M", "prompt": []}, 400, "empty"),
        ({"model": "M", "prompt": [10**7]}, 400, "token ids"),
        ({"model": "M", "prompt": "hi", "temperature": 9}, 400, "temperature"),
        ({"model": "M", "prompt": "hi", "n": 0}, 400, "n"),
        ({"model": "M", "prompt": "hi", "n": 17}, 400, "n"),
        ({"model": "M", "prompt": ["a", "b", "c", "d", "e"], "n": 16}, 400, "--max-prompts"),
        ({"prompt": "hi"}, 400, "model"),
        # values wider than the gRPC contract's fields: refused, not a 500
        ({"model": "M", "prompt": "hi", "seed": 2**70}, 400, "seed"),
        ({"model": "M", "prompt": "hi", "stop_token_ids": [2**40]}, 400, "stop_token_ids"),
        ({"model": "M", "prompt": "hi", "top_k": 2**40}, 400, "top_k"),
        ({"model": "M", "prompt": "hi", "max_tokens": 2**40}, 400, "max_tokens"),
        ({"model": "M", "prompt": "hi", "logit_bias": {"abc": 1}}, 400, "logit_bias keys"),
        ({"model": "M", "prompt": "hi", "logit_bias": {"123456789": 1}}, 400, "outside the vocabulary"),
        ({"model": "M", "prompt": "hi", "logit_bias": {"5": 250}}, 400, "logit_bias values"),
        ({"model": "M", "prompt": "hi", "logit_bias": {"5": "lots"}}, 400, "logit_bias"),
    ],
)
def test_bad_completion_requests_get_openai_errors(
    pd: Cluster, llama_checkpoint: Path, payload, status, needle
):
    if isinstance(payload, dict) and payload.get("model") == "M":
        payload = {**payload, "model": model_name(llama_checkpoint)}
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    r = httpx.post(f"{pd.url}/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["type"]


@pytest.mark.parametrize(
    ("payload", "status", "needle"),
    [
        ({"messages": []}, 400, "messages must not be empty"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
        ({"messages": [{"role": "user", "content": "x" * 20000}]}, 400, "maximum context length"),
        ({"messages": "hello"}, 400, "messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            400,
            "not supported",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, 400, "tool_choice"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web"}]}, 400, "tools[0]"),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}],
                "tool_choice": "required",
            },
            400,
            "cannot be compiled",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}},
            400,
            "response_format",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": 5}},
                },
            },
            400,
            "cannot be compiled",
        ),
    ],
)
def test_bad_chat_requests_get_openai_errors(pd: Cluster, llama_checkpoint: Path, payload, status, needle):
    r = httpx.post(f"{pd.url}/v1/chat/completions", json={"model": model_name(llama_checkpoint), **payload})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_metrics_and_health(pd: Cluster) -> None:
    health = httpx.get(f"{pd.url}/health").json()
    assert health["status"] == "ok" and {w["role"] for w in health["workers"]} == {"prefill", "decode"}
    text = httpx.get(f"{pd.url}/metrics").text
    assert 'pdmesh_requests_total{endpoint="completions",status="200"}' in text
    assert "pdmesh_time_to_first_token_seconds_bucket" in text
    assert 'pdmesh_ttft_phase_seconds_count{phase="transfer"}' in text
    assert "pdmesh_worker_kv_blocks_total" in text
