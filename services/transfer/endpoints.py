"""Which Mooncake transport moves KV between a prefill and a decode worker.

A worker opens one Mooncake engine per transport it accepts (`--transfer-protocol auto` opens every one that
applies) and advertises them as endpoints, with an id of its host. For each request the prefill worker takes the
first transport in PREFERENCE that both sides have and that applies to the pair: `nvlink_intra` only between GPU
workers on the same host, `rdma` where both have a NIC configured, `tcp` everywhere else.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

PROTOCOLS = ("tcp", "rdma", "nvlink_intra")
PREFERENCE = ("nvlink_intra", "rdma", "tcp")
SAME_HOST_ONLY = frozenset({"nvlink_intra"})


@dataclass(frozen=True)
class KvEndpoint:
    protocol: str
    session_id: str  # host:rpc_port of that transport's Mooncake engine


def host_id() -> str:
    """Who can reach this process's GPU memory through CUDA IPC: processes of the same kernel (boot id) in the same
    IPC namespace. Containers of one pod, or with the host's IPC namespace, share it; separate pods or hosts do
    not, and their pairs fall back to rdma or tcp."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ipc = os.readlink("/proc/self/ns/ipc")
    except OSError:  # no /proc: the host name is the best guess
        return socket.gethostname()
    return f"{boot}/{ipc}"


def protocols_for(requested: str, on_gpu: bool, nic: str) -> list[str]:
    """The transports a worker opens for `--transfer-protocol requested` (auto: all that apply, best first)."""
    if requested != "auto":
        if requested not in PROTOCOLS:
            raise ValueError(
                f"unknown transfer protocol '{requested}'; choose auto or one of {', '.join(PROTOCOLS)}"
            )
        if requested == "nvlink_intra" and not on_gpu:
            raise ValueError("the nvlink_intra transport moves GPU memory: run the worker with --device cuda")
        return [requested]
    chosen = ["nvlink_intra"] if on_gpu else []
    if nic:
        chosen.append("rdma")
    return [*chosen, "tcp"]


def choose(mine: list[str], my_host: str, offered: list[KvEndpoint], their_host: str) -> KvEndpoint:
    """The endpoint of the best transport both sides have; ValueError naming both sides when there is none."""
    by_protocol = {e.protocol: e for e in offered}
    for protocol in PREFERENCE:
        if protocol not in mine or protocol not in by_protocol:
            continue
        if protocol in SAME_HOST_ONLY and my_host != their_host:
            continue
        return by_protocol[protocol]
    theirs = ", ".join(e.protocol for e in offered) or "none"
    raise ValueError(
        f"no KV transport in common: this prefill worker has {', '.join(mine)}, the decode worker accepts "
        f"{theirs} (nvlink_intra only between workers on one host); start both with --transfer-protocol auto "
        "or the same protocol."
    )
