"""Conversions between the gRPC messages (pdmesh.v1) and the engine's plain types."""

from __future__ import annotations

from pdmesh.v1 import worker_pb2 as pb

from services.engine.engine import RequestOutput
from services.engine.sampling_params import SamplingParams
from services.engine.sequence import TokenLogprob
from services.transfer.destination import KvDestination
from services.transfer.endpoints import KvEndpoint


def sampling_to_proto(p: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        min_p=p.min_p,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        include_stop_str_in_output=p.include_stop_str_in_output,
        skip_special_tokens=p.skip_special_tokens,
    )
    if p.seed is not None:
        msg.seed = p.seed
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    return msg


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Raises RequestError for values the engine cannot serve."""
    return SamplingParams(
        max_tokens=msg.max_tokens,
        temperature=msg.temperature,
        top_k=msg.top_k,
        top_p=msg.top_p,
        min_p=msg.min_p,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        include_stop_str_in_output=msg.include_stop_str_in_output,
        skip_special_tokens=msg.skip_special_tokens,
    )


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
    )


def logprob_to_proto(lp: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
    )


def logprob_from_proto(msg: pb.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(msg.token_id, msg.logprob, [(t.token_id, t.logprob) for t in msg.top])


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
