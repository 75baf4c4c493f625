"""A worker told to stop (SIGTERM, as Kubernetes does) drains: it reports NOT_SERVING and refuses new calls,
the stream it is decoding still ends with every token, then it exits cleanly."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.cluster import start_cluster, wait_until


def not_serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return True  # refusing calls altogether
    return reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize("drain", ["30", "0.05"])
def test_sigterm_lets_the_stream_under_way_finish(llama_checkpoint: Path, tmp_path: Path, drain: str) -> None:
    """With the default drain the stream ends whole; with (almost) none it is cut, with an error event."""
    cluster = start_cluster(llama_checkpoint, tmp_path, "colocated", worker_args=("--drain-timeout", drain))
    try:
        (worker,) = cluster.of_role("colocated")
        body = {"model": llama_checkpoint.name, "prompt": [0, 5, 9], "max_tokens": 600, "ignore_eos": True}
        body |= {"stream": True, "return_token_ids": True}
        tokens, errors, done, signalled = 0, 0, False, False
        with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: {"):
                    event = json.loads(line[6:])
                    if "error" in event:
                        errors += 1
                        continue
                    tokens += len(event["choices"][0]["token_ids"])
                    if tokens >= 5 and not signalled:
                        worker.popen.send_signal(signal.SIGTERM)
                        signalled = True
                        wait_until(lambda: not_serving(worker.address), 5, "the worker to report NOT_SERVING")
        if drain == "30":
            assert done and tokens == 600 and errors == 0, (tokens, errors)
        else:
            assert tokens < 600 and errors == 1, (tokens, errors)
        wait_until(lambda: not worker.alive(), 20, "the worker to exit after draining")
        assert worker.popen.returncode == 0, worker.tail()
    finally:
        cluster.stop()
