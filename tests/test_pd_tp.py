"""Prefill and decode workers with tensor-parallel ranks (`pdmesh prefill --tp 2`, `pdmesh decode --tp 2`: 2 gloo
ranks each, in real processes), through the router: every prefill rank writes its own heads to the decode rank
holding the same heads; greedy tokens equal one process's and `transformers`'; every rank's bytes are verified by
checksum (a wrong one is caught, naming the rank); the decode worker computes no prompt token; nothing stays
reserved afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from pdmesh.v1 import worker_pb2 as pb
from pdmesh.v1 import worker_pb2_grpc as pb_grpc

from tests.cluster import Cluster, load, start_cluster, stream_completion, wait_until
from tests.conftest import build_hf_checkpoint
from tests.test_parallel_worker import MAX_TOKENS, PROMPTS, WORKER, expected

TP = ("--tp", "2")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tp_pd(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    model = build_hf_checkpoint(tmp_path_factory.mktemp(f"tp-{request.param}"), request.param)
    cluster = start_cluster(
        model,
        tmp_path_factory.mktemp("tp-pd"),
        "pd",
        worker_args=(*WORKER, *TP, "--num-blocks", "200"),
        router_args=("--kv-checksum",),
    )
    yield cluster
    cluster.stop()


def transformers_greedy(model: Path, prompt: list[int], n: int) -> list[int]:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt) :].tolist()


def test_tensor_parallel_prefill_and_decode(tp_pd: Cluster) -> None:
    model = tp_pd.model
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(lambda p: stream_completion(tp_pd.url, model.name, p, MAX_TOKENS), PROMPTS))
    tokens = [t for t, _, _ in results]
    assert tokens == expected(model)
    assert tokens[1] == transformers_greedy(model, PROMPTS[1], MAX_TOKENS)
    (prefill,) = tp_pd.of_role("prefill")
    (decode,) = tp_pd.of_role("decode")
    wait_until(lambda: load(decode.address).used_blocks == 0, 10, "the decode worker to free every block")
    after = load(decode.address)
    assert after.computed_prompt_tokens == 0  # every prompt's KV came from the prefill ranks
    assert after.computed_tokens > 0
    assert load(prefill.address).transferred_bytes > 0


def test_destination_names_every_rank_and_checksums_are_per_rank(tp_pd: Cluster) -> None:
    (decode,) = tp_pd.of_role("decode")
    with grpc.insecure_channel(decode.address) as channel:
        stub = pb_grpc.DecodeStub(channel)
        sampling = pb.SamplingParams(max_tokens=4, top_p=1.0)
        reserve = pb.ReserveRequest(request_id="probe", prompt_token_ids=PROMPTS[2], sampling=sampling)
        destination = stub.Reserve(reserve, timeout=10).destination
        ranks = destination.ranks
        assert len(ranks) == 2
        assert ranks[0].base_address == destination.base_address  # rank 0's, as the top-level fields
        assert ranks[0].endpoints[0].session_id != ranks[1].endpoints[0].session_id
        assert destination.layout_fingerprint.endswith("|TP2")
        # nothing was written: the checksums the decode ranks compute differ from made-up ones, rank by rank
        bad = pb.GenerateRequest(request_id="probe", first_token=7, kv_checksum=1, rank_kv_checksums=[1, 2])
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(bad, timeout=10))
        assert e.value.code() == grpc.StatusCode.DATA_LOSS
        assert "rank(s) [0, 1]" in e.value.details() and e.value.details().count("0x") == 4
    wait_until(lambda: load(decode.address).used_blocks == 0, 10, "the probe's blocks to be freed")
