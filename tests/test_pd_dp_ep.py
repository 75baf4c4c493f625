"""Prefill and decode workers with data-parallel attention and expert parallelism (`--dp 2 --ep 2` on both sides,
2 gloo ranks each, real processes) for Qwen3-MoE and DeepSeek-V3 (MLA): a request lives on one replica on each
side and its KV goes from the prefill replica to the decode replica it was reserved on; greedy tokens equal one
process's, with two-batch overlap on (steps actually overlapped on both sides) and off."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from services.engine import LLM, SamplingParams
from tests.cluster import Cluster, load, random_prompts, start_cluster, stream_completion, wait_until
from tests.test_moe_models import build as build_moe

PROMPTS = random_prompts(5, [6, 21, 33, 12, 27, 9])
MAX_TOKENS = 8
WORKER = (
    "--block-size",
    "4",
    "--max-num-batched-tokens",
    "32",
    "--num-blocks",
    "200",
    "--dp",
    "2",
    "--ep",
    "2",
)
TBO = ("--tbo", "--tbo-min-prefill-tokens", "8", "--tbo-min-decode-seqs", "2")


def one_process(model: Path, device: str = "cpu") -> list[list[int]]:
    llm = LLM(str(model), device=device, dtype="float32", block_size=4, progress=False)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return [o.token_ids for o in llm.generate(PROMPTS, params, progress=False)]


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v3"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp(request.param)
    build_moe(request.param, path)
    return path


@pytest.fixture(params=["tbo", "no-tbo"])
def cluster(request: pytest.FixtureRequest, model: Path, tmp_path: Path) -> Iterator[Cluster]:
    extra = TBO if request.param == "tbo" else ()
    c = start_cluster(model, tmp_path, "pd", worker_args=(*WORKER, *extra), router_args=("--kv-checksum",))
    c.tbo = request.param == "tbo"  # type: ignore[attr-defined]
    yield c
    c.stop()


def test_data_parallel_expert_parallel_pd(cluster: Cluster, model: Path) -> None:
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(lambda p: stream_completion(cluster.url, model.name, p, MAX_TOKENS), PROMPTS))
    assert [tokens for tokens, _, _ in results] == one_process(model)
    (prefill,) = cluster.of_role("prefill")
    (decode,) = cluster.of_role("decode")
    wait_until(lambda: load(decode.address).used_blocks == 0, 10, "the decode worker to free every block")
    p, d = load(prefill.address), load(decode.address)
    assert d.computed_prompt_tokens == 0
    assert [r.running for r in d.replicas] == [0, 0] and len(p.replicas) == 2
    # both replicas served on each side (a request goes to the replica with fewer live ones)
    assert all(r.total_blocks == 200 and r.computed_tokens > 0 for r in (*p.replicas, *d.replicas))
    if cluster.tbo:  # type: ignore[attr-defined]
        assert p.tbo_steps > 0 and d.tbo_steps > 0, (p.tbo_steps, d.tbo_steps)
    else:
        assert p.tbo_steps == 0 and d.tbo_steps == 0
