"""Worker discovery on a Ray cluster: the worker actors of one `pdmesh ray up` deployment.

Every interval the router lists the named actors of the deployment (`NAME-prefill-0`, ...) and asks each where
it serves. An actor that is starting, restarting (Ray restarts a worker actor whose process died, on a new port)
or gone does not answer in time and is left out until it does, so a restarted worker rejoins by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from services.raycluster.names import WORKER_ROLES, parse_actor_name
from services.router.workers import Members

log = logging.getLogger("pdmesh.router")
INTERVAL_S = 1.0
ANSWER_TIMEOUT_S = 2.0


async def _address(handle: Any) -> str | None:
    ref = handle.info.remote()
    info = await asyncio.wait_for(asyncio.wrap_future(ref.future()), ANSWER_TIMEOUT_S)
    return info.get("address")


async def watch_actors(
    deployment: str, namespace: str, address: str = "auto", interval_s: float = INTERVAL_S
) -> AsyncIterator[Members]:
    """A snapshot of the deployment's serving workers whenever it changes (the first one at once)."""
    import ray

    if not ray.is_initialized():  # a router outside the cluster joins it as a driver
        await asyncio.to_thread(ray.init, address=address, namespace=namespace, log_to_driver=False)
    handles: dict[str, Any] = {}
    last: Members | None = None
    while True:
        try:
            listed = await asyncio.to_thread(ray.util.list_named_actors, all_namespaces=True)
        except Exception as e:  # the cluster's control plane is away: keep the last view
            log.warning("cannot list the actors of %s (%s)", deployment, e)
            listed = None
        if listed is not None:
            workers = {}
            for entry in listed:
                parsed = parse_actor_name(deployment, entry["name"])
                if entry["namespace"] == namespace and parsed and parsed[0] in WORKER_ROLES:
                    workers[entry["name"]] = parsed[0]
            for name in set(handles) - set(workers):
                del handles[name]
            for name in workers.keys() - handles.keys():
                with contextlib.suppress(ValueError):  # gone since the listing
                    handles[name] = await asyncio.to_thread(ray.get_actor, name, namespace=namespace)
            names = [n for n in workers if n in handles]
            answers = await asyncio.gather(*(_address(handles[n]) for n in names), return_exceptions=True)
            members: Members = {role: set() for role in WORKER_ROLES}
            for name, answer in zip(names, answers, strict=True):
                if isinstance(answer, str):
                    members[workers[name]].add(answer)
                elif isinstance(answer, ray.exceptions.RayActorError):
                    handles.pop(name, None)  # dead for good, or a new actor under the name: look it up again
            if members != last:
                found = "; ".join(f"{r} {', '.join(sorted(a))}" for r, a in members.items() if a)
                log.info("workers of Ray deployment %s: %s", deployment, found or "none")
                last = members
                yield {role: set(a) for role, a in members.items()}
        await asyncio.sleep(interval_s)
