"""The disaggregated path on a CUDA GPU: staging gathers on a side stream, Mooncake moving GPU memory, and greedy
tokens identical to `transformers` on the same GPU. Runs wherever a CUDA GPU is present (CI has none)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from services.engine.kv_cache import KVCache, KVLayout
from services.transfer.staging import StagingBuffer, step_event
from tests.cluster import Cluster, load, random_prompts, start_cluster, stream_completion

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_staging_gather_on_a_side_stream_is_fenced() -> None:
    layout = KVLayout(64, 4, 16, 8, 128, torch.bfloat16)
    cache = KVCache(layout, torch.device("cuda"))
    staging = StagingBuffer(cache.kv, layout.block_nbytes, num_slots=2, slot_blocks=16)
    side = torch.cuda.Stream()
    ids = [5, 9, 10, 11, 40, 2]
    for trial in range(20):
        torch.cuda._sleep(
            1_000_000
        )  # the step computing the blocks is still running when the gather is queued
        cache.kv.normal_()
        expected = cache.kv[ids].clone()
        fence = staging.gather(trial % 2, ids, step_event(cache.kv), side)
        fence.wait()
        assert torch.equal(staging.buffer[trial % 2, : len(ids)], expected)
        cache.kv.zero_()


@pytest.fixture(scope="module", params=["auto", "tcp"])
def gpu_pd(
    request: pytest.FixtureRequest, llama_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    cluster = start_cluster(
        llama_checkpoint,
        tmp_path_factory.mktemp(f"gpu-{request.param}"),
        worker_args=(
            "--device",
            "cuda",
            "--dtype",
            "float32",
            "--max-num-batched-tokens",
            "32",
            "--transfer-protocol",
            request.param,
        ),
        router_args=("--kv-checksum",),
    )
    yield cluster
    cluster.stop()


def test_pd_on_gpu_matches_transformers(gpu_pd: Cluster, llama_checkpoint: Path) -> None:
    """Over each transport (auto: CUDA IPC between the two processes on this GPU), with KV checksums on."""
    from transformers import AutoModelForCausalLM

    from tests.test_models_vs_transformers import hf_generate

    hf = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    decode = gpu_pd.of_role("decode")[0].address
    for prompt in random_prompts(11, [7, 64, 150]):
        tokens, _, usage = stream_completion(gpu_pd.url, llama_checkpoint.name, prompt, 24)
        assert tokens == hf_generate(hf, prompt, 24)[0]
        assert usage["usage"]["completion_tokens"] == 24
    assert load(decode).computed_prompt_tokens == 0
    assert load(decode).used_blocks == 0
    (prefill,) = gpu_pd.of_role("prefill")
    log = prefill.log.read_text()
    chosen = "nvlink_intra" if "auto" in str(gpu_pd.log_dir) else "tcp"
    assert f"go over {chosen}" in log, log[-2000:]


def test_a_mixed_fleet_uses_the_best_transport_per_pair(llama_checkpoint: Path, tmp_path: Path) -> None:
    """One GPU prefill worker, a GPU decode worker (CUDA IPC applies) and a CPU decode worker (only TCP does): the
    router alternates between them and each pair moves KV over its own transport, checksums on."""
    from transformers import AutoModelForCausalLM

    from tests.cluster import Cluster
    from tests.test_models_vs_transformers import hf_generate

    common = ("--dtype", "float32", "--max-num-batched-tokens", "32")
    cluster = Cluster(llama_checkpoint, tmp_path)
    try:
        cluster.worker("prefill", "--device", "cuda", *common)
        cluster.worker("decode", "--device", "cuda", *common)
        cluster.worker("decode", "--device", "cpu", *common)
        cluster.router("--kv-checksum")
        cluster.wait_ready()
        hf = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
        for prompt in random_prompts(12, [9, 70, 130, 40]):
            tokens, _, _ = stream_completion(cluster.url, llama_checkpoint.name, prompt, 16)
            assert tokens == hf_generate(hf, prompt, 16)[0]
        log = cluster.of_role("prefill")[0].log.read_text()
        assert "go over nvlink_intra" in log and "go over tcp" in log, log[-2000:]
        for proc in cluster.of_role("decode"):
            assert load(proc.address).used_blocks == 0
    finally:
        cluster.stop()
