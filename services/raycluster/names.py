"""How a deployment's actors and placement groups are named: `NAME-ROLE-INDEX` and `NAME-ROLE-INDEX-pg`, in one
Ray namespace. Everything that finds them (status, down, the routers' discovery) goes through here."""

from __future__ import annotations

import re

NAMESPACE = "pdmesh"
ROLES = ("router", "prefill", "decode", "colocated")
WORKER_ROLES = ROLES[1:]


def actor_name(deployment: str, role: str, index: int) -> str:
    return f"{deployment}-{role}-{index}"


def placement_group_name(actor: str) -> str:
    return f"{actor}-pg"


def parse_actor_name(deployment: str, name: str) -> tuple[str, int] | None:
    """(role, index) of one of `deployment`'s actors, None for any other name."""
    m = re.fullmatch(rf"{re.escape(deployment)}-({'|'.join(ROLES)})-(\d+)", name)
    return (m[1], int(m[2])) if m else None


def check_deployment(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?", name):
        raise ValueError(
            f"deployment name {name!r}: use 1-40 lowercase letters, digits and '-' (not at either end)"
        )
    return name
