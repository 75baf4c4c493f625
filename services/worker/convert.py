"""Conversions between the gRPC messages (pdmesh.v1) and the worker's types (KV destinations, engine outputs);
the light ones the router shares live in services.common.convert."""

from __future__ import annotations

from pdmesh.v1 import worker_pb2 as pb

from services.common.convert import logprob_to_proto
from services.engine.engine import RequestOutput
from services.transfer.destination import KvDestination, RankTarget
from services.transfer.endpoints import KvEndpoint


def endpoints_to_proto(endpoints: tuple[KvEndpoint, ...]) -> list[pb.KvEndpoint]:
    return [pb.KvEndpoint(protocol=e.protocol, session_id=e.session_id) for e in endpoints]


def destination_to_proto(d: KvDestination) -> pb.KvDestination:
    return pb.KvDestination(
        endpoints=endpoints_to_proto(d.endpoints),
        host_id=d.host_id,
        base_address=d.base_address,
        block_nbytes=d.block_nbytes,
        block_ids=list(d.block_ids),
        num_cached_tokens=d.num_cached_tokens,
        layout_fingerprint=d.layout_fingerprint,
        lease_address=d.lease_address,
        lease_s=d.lease_s,
        ranks=[
            pb.KvRank(
                endpoints=endpoints_to_proto(r.endpoints), host_id=r.host_id, base_address=r.base_address
            )
            for r in d.ranks
        ],
    )


def destination_from_proto(msg: pb.KvDestination) -> KvDestination:
    return KvDestination(
        endpoints=tuple(KvEndpoint(e.protocol, e.session_id) for e in msg.endpoints),
        host_id=msg.host_id,
        base_address=msg.base_address,
        block_nbytes=msg.block_nbytes,
        block_ids=tuple(msg.block_ids),
        num_cached_tokens=msg.num_cached_tokens,
        layout_fingerprint=msg.layout_fingerprint,
        lease_address=msg.lease_address,
        lease_s=msg.lease_s,
        ranks=tuple(
            RankTarget(
                tuple(KvEndpoint(e.protocol, e.session_id) for e in r.endpoints), r.host_id, r.base_address
            )
            for r in msg.ranks
        ),
    )


def chunk_from_output(out: RequestOutput, timings: pb.Timings | None = None) -> pb.TokenChunk:
    return pb.TokenChunk(
        token_ids=out.new_token_ids,
        text=out.new_text,
        finished=out.finished,
        finish_reason=out.finish_reason or "",
        stop_reason="" if out.stop_reason is None else str(out.stop_reason),
        prompt_tokens=out.num_prompt_tokens,
        completion_tokens=out.num_output_tokens,
        cached_tokens=out.num_cached_tokens,
        logprobs=[logprob_to_proto(lp) for lp in out.new_logprobs],
        timings=timings,
    )
