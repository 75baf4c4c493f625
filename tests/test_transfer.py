"""KV transfer pieces against real Mooncake TCP transfers and real worker processes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from pdmesh.v1 import worker_pb2 as pb
from pdmesh.v1 import worker_pb2_grpc as pb_grpc

from services.engine.kv_cache import KVCache, KVLayout
from services.transfer.checksum import kv_checksum
from services.transfer.destination import KvDestination
from services.transfer.endpoints import KvEndpoint
from services.transfer.mooncake_engine import MooncakeEngine, MooncakeEngines, TransferError
from services.transfer.peer import coalesce
from services.transfer.sender import KvSender
from services.transfer.staging import StagingBuffer
from tests.cluster import Cluster, Proc, load, wait_until

SAMPLING = pb.SamplingParams(max_tokens=4, temperature=0, top_p=1, ignore_eos=True, skip_special_tokens=True)


def test_coalesce_merges_contiguous_destinations() -> None:
    src, dst, lengths = coalesce(1000, [500, 510, 520, 900, 910, 600], 10)
    assert src == [1000, 1030, 1050]
    assert dst == [500, 900, 600]
    assert lengths == [30, 20, 10]


def test_checksum_sees_every_byte_and_the_block_order() -> None:
    kv = torch.randn(6, 2, 2, 4, 2, 8)
    base = kv_checksum(kv, [1, 2, 3])
    assert base == kv_checksum(kv.clone(), [1, 2, 3])
    assert base != kv_checksum(kv, [2, 1, 3])
    flipped = kv.clone()
    flipped.view(torch.int32)[2, 1, 0, 3, 1, 7] ^= 1  # one bit of one word
    assert base != kv_checksum(flipped, [1, 2, 3])
    assert kv_checksum(flipped, [1, 3]) == kv_checksum(kv, [1, 3])


def test_sender_reports_an_unreachable_peer_instead_of_hanging() -> None:
    layout = KVLayout(
        num_blocks=8, num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float32
    )
    cache = KVCache(layout, torch.device("cpu"))
    engines = MooncakeEngines("127.0.0.1", ["tcp"], "", timeout_s=5, required=True)
    staging = StagingBuffer(cache.kv, layout.block_nbytes, num_slots=2, slot_blocks=4)
    sender = KvSender(engines, cache.kv, layout.block_size, layout.block_nbytes, staging, timeout_s=5)
    try:
        nowhere = KvDestination(
            (KvEndpoint("tcp", "127.0.0.1:1"),), "elsewhere", 1 << 20, layout.block_nbytes, (0, 1), 0, "x"
        )
        sender.begin("r", nowhere, 8, checksum=False)
        sender.push_ready({"r": ([3, 5], 2)})
        sender.close("r", [3, 5])
        started = time.monotonic()
        with pytest.raises(TransferError, match=r"127\.0\.0\.1:1"):
            sender.wait("r", 20)
        assert time.monotonic() - started < 20
    finally:
        sender.stop()


@pytest.fixture(scope="module")
def decode_worker(llama_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    cluster = Cluster(llama_checkpoint, tmp_path_factory.mktemp("decode"))
    proc = cluster.worker("decode", "--num-blocks", "256", "--reservation-lease", "2", "--quarantine", "0.5")
    cluster.wait_workers()
    yield proc
    cluster.stop()


def write_blocks(engine: MooncakeEngine, dest: pb.KvDestination, blocks: torch.Tensor) -> None:
    engine.register(blocks)
    nbytes = dest.block_nbytes
    src = [blocks.data_ptr() + i * nbytes for i in range(len(dest.block_ids))]
    (session,) = [e.session_id for e in dest.endpoints if e.protocol == "tcp"]
    engine.write(session, src, [dest.base_address + b * nbytes for b in dest.block_ids], [nbytes] * len(src))


def test_decode_accepts_matching_and_rejects_mismatching_kv(decode_worker: Proc) -> None:
    channel = grpc.insecure_channel(decode_worker.address)
    decode = pb_grpc.DecodeStub(channel)
    info = pb_grpc.WorkerStub(channel).GetInfo(pb.GetInfoRequest())
    engine = MooncakeEngine("127.0.0.1", "tcp")
    prompt = list(range(4, 44))  # 40 tokens: 3 blocks of 16
    for rid, tamper in (("good", False), ("bad", True)):
        dest = decode.Reserve(
            pb.ReserveRequest(request_id=rid, prompt_token_ids=prompt, sampling=SAMPLING)
        ).destination
        assert dest.layout_fingerprint == info.layout_fingerprint and len(dest.block_ids) == 3
        shape = (3, 2, 2, info.block_size, 2, 16)  # the checkpoint's layers, K/V, block, kv heads, head dim
        blocks = torch.randn(shape)
        assert blocks[0].numel() * 4 == dest.block_nbytes
        write_blocks(engine, dest, blocks)
        checksum = kv_checksum(blocks, [0, 1, 2]) ^ (1 if tamper else 0)
        request = pb.GenerateRequest(request_id=rid, first_token=7, kv_checksum=checksum)
        if not tamper:
            chunks = list(decode.Generate(request))
            assert sum(len(c.token_ids) for c in chunks) == 4 and chunks[-1].finished
        else:
            with pytest.raises(grpc.RpcError) as e:
                list(decode.Generate(request))
            assert e.value.code() == grpc.StatusCode.DATA_LOSS and "checksum mismatch" in e.value.details()
    wait_until(
        lambda: load(decode_worker.address).used_blocks == 0, 10, "the rejected request's blocks to be freed"
    )
    assert load(decode_worker.address).computed_prompt_tokens == 0


def test_standard_health_service_answers(decode_worker: Proc) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(decode_worker.address))
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


def test_reservation_expires_and_unknown_generate_is_refused(decode_worker: Proc) -> None:
    decode = pb_grpc.DecodeStub(grpc.insecure_channel(decode_worker.address))
    with pytest.raises(grpc.RpcError) as e:
        list(decode.Generate(pb.GenerateRequest(request_id="never-reserved", first_token=1)))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND

    def reserve(rid: str, first: int) -> pb.ReserveResponse:
        prompt = [first + i % 400 for i in range(2000)]  # 125 blocks of the worker's 256
        return decode.Reserve(pb.ReserveRequest(request_id=rid, prompt_token_ids=prompt, sampling=SAMPLING))

    reserve("a", 4)
    reserve("b", 5)
    with pytest.raises(grpc.RpcError) as e:
        reserve("c", 6)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry" in e.value.details()
    decode.Release(pb.ReleaseRequest(request_id="a", writer_done=True))
    assert load(decode_worker.address).used_blocks == 125  # freed at once: the writer confirmed it is done
    # "b" gets no Generate and no renewal: its lease lapses (2 s), waits out the quarantine, and is freed
    wait_until(
        lambda: load(decode_worker.address).used_blocks == 0, 10, "the expired reservation to be freed"
    )
    with pytest.raises(grpc.RpcError) as e:
        list(decode.Generate(pb.GenerateRequest(request_id="b", first_token=1)))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_transport_is_chosen_per_pair() -> None:
    from services.transfer.endpoints import choose, host_id, protocols_for

    here = host_id()
    gpu_decode = [KvEndpoint("nvlink_intra", "a:1"), KvEndpoint("rdma", "a:2"), KvEndpoint("tcp", "a:3")]
    gpu_prefill = protocols_for("auto", on_gpu=True, nic="mlx5_0")
    assert gpu_prefill == ["nvlink_intra", "rdma", "tcp"]
    assert choose(gpu_prefill, here, gpu_decode, here).protocol == "nvlink_intra"  # same host: CUDA IPC
    assert choose(gpu_prefill, here, gpu_decode, "another-host").protocol == "rdma"  # across hosts: the NIC
    no_nic = protocols_for("auto", on_gpu=True, nic="")
    assert choose(no_nic, here, gpu_decode, "another-host").protocol == "tcp"
    cpu_decode = [KvEndpoint("tcp", "b:1")]
    assert protocols_for("auto", on_gpu=False, nic="") == ["tcp"]
    assert choose(gpu_prefill, here, cpu_decode, here) == cpu_decode[0]  # a mixed fleet: each pair its own
    with pytest.raises(ValueError, match=r"no KV transport in common.*nvlink_intra"):
        choose(["nvlink_intra"], here, gpu_decode, "another-host")
    with pytest.raises(ValueError, match="--device cuda"):
        protocols_for("nvlink_intra", on_gpu=False, nic="")
    with pytest.raises(ValueError, match="unknown transfer protocol 'udp'"):
        protocols_for("udp", on_gpu=False, nic="")
    assert "/" in here and here == host_id()  # stable within a host


def test_tombstones_forget_after_their_time() -> None:
    from services.worker.tombstones import Tombstones

    t = Tombstones(keep_s=0.2)
    t.add("a")
    assert "a" in t and "b" not in t
    time.sleep(0.3)
    t.add("b")  # adding sweeps out what is older than keep_s
    assert "a" not in t and "b" in t
