"""Multi-rank prefill and decode workers on one host's GPUs, through the router with KV checksums verified and
two-batch overlap on in both roles: tensor-parallel (`--tp 2` on each side) on a dense model, data-parallel
attention with expert parallelism (`--dp 2 --ep 2`) on Qwen3-MoE and DeepSeek-V3 (MLA). The prefill ranks take
GPUs 0-1, the decode ranks GPUs 2-3 (`--device cuda:N`: rank r on GPU N + r). Greedy tokens (fp32) equal one
GPU's. Runs wherever 4 CUDA GPUs are present (CI has none)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.cluster import Cluster, load, stream_completion, wait_until
from tests.test_moe_models import build as build_moe
from tests.test_pd_dp_ep import MAX_TOKENS, PROMPTS, TBO, one_process

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs four CUDA GPUs")

COMMON = ("--block-size", "4", "--max-num-batched-tokens", "32", "--num-blocks", "200", "--dtype", "float32")
LAYOUTS = {"tp": ("--tp", "2"), "dp_ep": ("--dp", "2", "--ep", "2")}


@pytest.fixture(scope="module", params=["tp-llama", "dp_ep-qwen3_moe", "dp_ep-deepseek_v3"])
def case(
    request: pytest.FixtureRequest, llama_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    layout, name = request.param.split("-")
    if name == "llama":
        return layout, llama_checkpoint
    path = tmp_path_factory.mktemp(name)
    build_moe(name, path)
    return layout, path


@pytest.fixture(scope="module")
def cluster(case: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    layout, model = case
    c = Cluster(model, tmp_path_factory.mktemp(f"gpu-{layout}"))
    try:
        for role, first_gpu in (("prefill", 0), ("decode", 2)):
            c.worker(role, *COMMON, *LAYOUTS[layout], *TBO, "--device", f"cuda:{first_gpu}")
        c.router("--kv-checksum")
        c.wait_ready(timeout=300)
        yield c
    finally:
        c.stop()


def test_multi_rank_pd_on_four_gpus_equals_one_gpu(case: tuple[str, Path], cluster: Cluster) -> None:
    layout, model = case
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(lambda p: stream_completion(cluster.url, model.name, p, MAX_TOKENS), PROMPTS))
    assert [tokens for tokens, _, _ in results] == one_process(model, "cuda")
    (prefill,) = cluster.of_role("prefill")
    (decode,) = cluster.of_role("decode")
    wait_until(lambda: load(decode.address).used_blocks == 0, 10, "the decode worker to free every block")
    p, d = load(prefill.address), load(decode.address)
    assert d.computed_prompt_tokens == 0 and p.transferred_bytes > 0  # every prompt's KV came over
    assert p.tbo_steps > 0 and d.tbo_steps > 0, (p.tbo_steps, d.tbo_steps)
    if layout == "dp_ep":  # both replicas served on each side
        assert all(r.computed_tokens > 0 for r in (*p.replicas, *d.replicas))
