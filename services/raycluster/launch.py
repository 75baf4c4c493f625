"""`pdmesh ray up|status|down`: a deployment on an existing Ray cluster.

`up` starts, as named detached actors in one namespace, NAME-prefill-I / NAME-decode-I (or NAME-colocated-I)
workers, each in its own placement group (one bundle with a GPU per rank, on one node, kept across restarts), and
NAME-router-I replicas on the head node sharing HTTP port P. Actors restart when they fail (`--max-restarts`);
routers find the workers through Ray, restarted ones included. `up` waits until the routers serve every worker
and gives back everything it started if that does not happen. `down` drains the workers, then removes the
actors and placement groups.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.raycluster.names import (
    NAMESPACE,
    ROLES,
    actor_name,
    check_deployment,
    parse_actor_name,
    placement_group_name,
)
from services.up import add_cluster_arguments, cluster_roles, router_argv, worker_argv

STARTUP_TIMEOUT_S = 600.0
PLACEMENT_TIMEOUT_S = 60.0
ANSWER_TIMEOUT_S = 5.0
STARTUP_RESTARTS = 3  # restarts of one actor while `up` waits: it is failing, not starting
HEAD = "node:__internal_head__"  # a resource only the head node has


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="ray_command", required=True, metavar="up|status|down")
    up = sub.add_parser("up", help="start a deployment on a Ray cluster")
    _common(up)
    add_cluster_arguments(up)
    up.add_argument("--host", default="0.0.0.0", help="address the routers listen on, on the head node")
    par = up.add_argument_group("parallel workers (every rank takes a GPU; a worker's ranks share one node)")
    par.add_argument("--tp", type=int, default=1)
    par.add_argument("--dp", type=int, default=1)
    par.add_argument("--ep", type=int, default=1)
    par.add_argument("--tbo", action="store_true")
    up.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        help="another option for every worker, e.g. --worker-arg=--max-model-len=4096 (repeatable)",
    )
    up.add_argument(
        "--max-restarts", type=int, default=-1, help="restarts of a failed actor (default -1: no limit)"
    )
    up.add_argument("--timeout", type=float, default=STARTUP_TIMEOUT_S, help="seconds to wait for readiness")
    up.add_argument(
        "--keep-on-failure", action="store_true", help="leave the actors running when start-up fails"
    )
    status = sub.add_parser("status", help="the actors of a deployment and where they serve")
    _common(status)
    status.add_argument("--json", action="store_true", help="print one JSON object")
    down = sub.add_parser("down", help="drain and remove a deployment")
    _common(down)
    down.add_argument("--drain-timeout", type=float, default=30.0, help="seconds requests under way get")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", default="auto", help="the Ray cluster (default: the one this node is in)"
    )
    parser.add_argument("--name", default="pdmesh", help="the deployment's name (prefix of its actors)")
    parser.add_argument("--namespace", default=NAMESPACE, help="Ray namespace of the actors")


def run_ray(args: argparse.Namespace) -> int:
    check_deployment(args.name)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {"up": _up, "status": _status, "down": _down}
    _connect(args.address, args.namespace)
    return commands[args.ray_command](args)


def _connect(address: str, namespace: str) -> None:
    import ray

    host, sep, port = address.rpartition(":")
    if sep and port.isdigit() and "://" not in address:
        try:  # NOTE: Ray itself retries an unreachable head for minutes
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as e:
            raise ValueError(
                f"cannot reach the Ray cluster at {address} ({e}); is its head running (`ray start --head`)?"
            ) from None
    try:
        ray.init(
            address=address,
            namespace=namespace,
            log_to_driver=False,
            logging_level=logging.WARNING,
            configure_logging=False,
        )
    except ConnectionError as e:
        raise ValueError(f"cannot reach the Ray cluster at {address!r}: {e}") from e
    # NOTE: Ray warns that a restartable actor dies with its placement group; that is meant: `down` removes both
    logging.getLogger("ray.actor").setLevel(logging.ERROR)


def _say(message: str) -> None:
    print(f"pdmesh: {message}", flush=True)


# ---- finding a deployment ------------------------------------------------------------------------------------
@dataclass
class Member:
    name: str
    role: str
    index: int
    handle: Any


def members(deployment: str, namespace: str) -> list[Member]:
    import ray

    found = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        parsed = parse_actor_name(deployment, entry["name"])
        if entry["namespace"] != namespace or parsed is None:
            continue
        try:
            handle = ray.get_actor(entry["name"], namespace=namespace)
        except ValueError:
            continue
        found.append(Member(entry["name"], parsed[0], parsed[1], handle))
    return sorted(found, key=lambda m: (ROLES.index(m.role), m.index))


def _info(member: Member, timeout_s: float = ANSWER_TIMEOUT_S) -> dict[str, Any] | None:
    import ray

    try:
        return ray.get(member.handle.info.remote(), timeout=timeout_s)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError):
        return None


def _states(namespace: str) -> dict[str, Any]:
    """Ray's record of every actor of the namespace by name (state, restarts, pid); empty without the state API."""
    try:
        from ray.util.state import list_actors

        actors = list_actors(
            filters=[("ray_namespace", "=", namespace)], limit=10_000, timeout=10, detail=True
        )
    except Exception:  # a cluster without its dashboard serves no state API
        return {}
    alive = {a.name: a for a in actors if a.name and a.state != "DEAD"}
    return alive


def _log_tail(actor_id: str, lines: int = 30) -> str:
    try:
        from ray.util.state import get_log

        text = "".join(get_log(actor_id=actor_id, tail=lines, suffix="err", timeout=10))
        text += "".join(get_log(actor_id=actor_id, tail=lines, suffix="out", timeout=10))
        return text.strip() or "(empty log)"
    except Exception as e:
        return f"(no log: {e})"


# ---- up ------------------------------------------------------------------------------------------------------
def _up(args: argparse.Namespace) -> int:
    if existing := members(args.name, args.namespace):
        raise ValueError(
            f"deployment {args.name!r} is already running ({len(existing)} actors in namespace "
            f"{args.namespace!r}); stop it with `pdmesh ray down --name {args.name}` or pick another --name"
        )
    roles = cluster_roles(args)
    for flag in ("tp", "dp", "ep"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1")
    model = _model(args.model)
    ranks = args.tp * args.dp
    gpus = _gpus_per_worker(args.device, ranks, sum(n for _, n in roles))
    common = [*worker_argv(args, model), "--device", "cuda" if gpus else "cpu", *args.worker_arg]
    common += ["--tp", str(args.tp), "--dp", str(args.dp), "--ep", str(args.ep)]
    common += ["--tbo"] if args.tbo else []
    started: list[str] = []
    try:
        workers = [
            _start_worker(args, role, i, common, gpus, started) for role, count in roles for i in range(count)
        ]
        routers = [_start_router(args, model, i, started) for i in range(args.routers)]
        url = _wait_ready(args, workers, routers, {role: count for role, count in roles})
    except (Exception, KeyboardInterrupt) as e:
        if isinstance(e, KeyboardInterrupt):
            print("pdmesh: interrupted", file=sys.stderr)
        elif not isinstance(e, StartupFailed):
            print(f"pdmesh ray up: error: {e}", file=sys.stderr)
        if args.keep_on_failure:
            print(f"pdmesh: left {len(started)} actors running (--keep-on-failure)", file=sys.stderr)
        else:
            print("pdmesh: removing what was started", file=sys.stderr)
            _remove(args.name, args.namespace, drain_s=0.0, quiet=True)
        return 1
    model_name = Path(model).name
    auth = f' -H "Authorization: Bearer {args.api_key}"' if args.api_key else ""
    _say(
        f"ready at {url}  (model '{model_name}'; deployment '{args.name}', namespace '{args.namespace}')\n\n"
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
        f'    -d \'{{"model": "{model_name}", "messages": [{{"role": "user", "content": "Hello!"}}], '
        f'"max_tokens": 32}}\'\n\n'
        f"  pdmesh ray status --name {args.name}    pdmesh ray down --name {args.name}"
    )
    return 0


class StartupFailed(RuntimeError):
    pass


def _model(model: str | None) -> str:
    if model:
        # NOTE: the path is read on the nodes the actors run on; only this node's copy can be checked here
        path = Path(model).resolve()
        if not (path / "config.json").exists():
            raise ValueError(
                f"--model {model}: no config.json there (a checkpoint must be at this path on every node)"
            )
        return str(path)
    from services.engine.tiny_model import default_model_dir

    return str(default_model_dir())


def _gpus_per_worker(device: str, ranks: int, workers: int) -> int:
    """GPUs each worker takes (one per rank, or none on CPUs), checked against what the cluster has."""
    import ray

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {device}: use auto, cpu or cuda on Ray (Ray assigns the GPUs)")
    total = int(ray.cluster_resources().get("GPU", 0))
    if device == "cpu" or (device == "auto" and total == 0):
        if ranks > 1:
            raise ValueError("--tp/--dp above 1 need GPUs (one per rank); this cluster has none")
        return 0
    per_node = max((int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n["Alive"]), default=0)
    if per_node < ranks:
        raise ValueError(
            f"each worker needs {ranks} GPUs on one node (--tp x --dp); the largest node has {per_node}"
        )
    if total < ranks * workers:
        raise ValueError(
            f"{workers} workers x {ranks} GPUs = {ranks * workers} GPUs; the cluster has {total}"
        )
    return ranks


def _start_worker(
    args: argparse.Namespace, role: str, index: int, common: list[str], gpus: int, started: list[str]
) -> Member:
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from services.raycluster.actors import WorkerActor

    name = actor_name(args.name, role, index)
    bundle = {"CPU": 1.0, **({"GPU": float(gpus)} if gpus else {})}
    group = placement_group(
        [bundle], strategy="STRICT_PACK", name=placement_group_name(name), lifetime="detached"
    )
    started.append(placement_group_name(name))
    try:
        ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise ValueError(
            f"no node could take {name} ({bundle}) within {PLACEMENT_TIMEOUT_S:.0f}s; see `ray status`"
        ) from None
    strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
    handle = _detached(WorkerActor, name, args, num_cpus=1, num_gpus=gpus, scheduling_strategy=strategy)
    handle = handle.remote(role, common)
    started.append(name)
    _say(f"{name}: starting ({gpus} GPU{'s' if gpus != 1 else ''})" if gpus else f"{name}: starting (CPU)")
    return Member(name, role, index, handle)


def _detached(cls: type, name: str, args: argparse.Namespace, **placement: Any) -> Any:
    """One of the deployment's actors: named, outliving this command, restarted when it fails."""
    import ray

    return ray.remote(cls).options(
        name=name,
        namespace=args.namespace,
        lifetime="detached",
        max_restarts=args.max_restarts,
        max_concurrency=4,
        **placement,
    )


def _start_router(args: argparse.Namespace, model: str, index: int, started: list[str]) -> Member:

    from services.raycluster.actors import RouterActor
    from services.router.server import add_router_arguments, router_config

    parser = argparse.ArgumentParser(prog="pdmesh router")
    add_router_arguments(parser)
    argv = [*router_argv(args, model), "--ray-deployment", args.name, "--ray-namespace", args.namespace]
    config = router_config(parser.parse_args(argv), model)
    name = actor_name(args.name, "router", index)
    # NOTE: no logical CPU, like Ray Serve's proxies: it must fit on the head whatever the workers take there
    handle = _detached(RouterActor, name, args, num_cpus=0, resources={HEAD: 0.001})
    handle = handle.remote(config, args.host, args.port, args.log_level.lower())
    started.append(name)
    _say(f"{name}: starting on the head node, port {args.port}")
    return Member(name, "router", index, handle)


def _wait_ready(
    args: argparse.Namespace, workers: list[Member], routers: list[Member], expected: dict[str, int]
) -> str:
    started = time.monotonic()
    deadline = started + args.timeout
    said: dict[str, str] = {}
    while True:
        states = _states(args.namespace)
        for m in [*workers, *routers]:
            state = states.get(m.name)
            if state is not None and state.state == "PENDING_CREATION":
                waited = time.monotonic() - started
                if waited > PLACEMENT_TIMEOUT_S:
                    raise ValueError(
                        f"{m.name} could not be placed in {PLACEMENT_TIMEOUT_S:.0f}s: no node has "
                        f"{state.required_resources} free (`ray status` shows what the cluster has and holds)"
                    )
                if waited > 10 and said.get(m.name) != "pending":
                    said[m.name] = "pending"
                    _say(f"{m.name}: waiting for resources {state.required_resources}")
            if state is not None and (state.num_restarts or 0) >= STARTUP_RESTARTS:
                print(
                    f"pdmesh: {m.name} failed {state.num_restarts} times while starting; its last log lines:\n"
                    f"{_log_tail(state.actor_id)}",
                    file=sys.stderr,
                )
                raise StartupFailed(m.name)
        infos = {m.name: _info(m, timeout_s=1.0) for m in [*workers, *routers]}
        for m in workers:
            info = infos[m.name]
            if info and info["address"] and said.get(m.name) != "ready":
                said[m.name] = "ready"
                gpus = f", GPUs {','.join(info['gpus'])}" if info["gpus"] else ""
                _say(f"{m.name}: serving at {info['address']}{gpus}")
        ready = []
        for m in routers:
            info = infos[m.name]
            serving = info["workers"] if info else {}
            if info and info["ready"] and all(len(serving.get(r, ())) >= n for r, n in expected.items()):
                ready.append(info)
                if said.get(m.name) != "ready":
                    said[m.name] = "ready"
                    _say(f"{m.name}: serving every worker ({info['replica']})")
        if len(ready) == len(routers):
            host = ready[0]["node_ip"] if args.host in ("0.0.0.0", "::") else args.host
            return f"http://{host}:{args.port}"
        if time.monotonic() > deadline:
            waiting = [m.name for m in [*workers, *routers] if said.get(m.name) != "ready"]
            raise ValueError(
                f"not ready after {args.timeout:.0f}s: {', '.join(waiting)} (their logs: Ray dashboard > Actors)"
            )
        time.sleep(1.0)


# ---- status --------------------------------------------------------------------------------------------------
def _status(args: argparse.Namespace) -> int:
    found = members(args.name, args.namespace)
    states = _states(args.namespace)
    rows = []
    for m in found:
        info = _info(m)
        state = states.get(m.name)
        rows.append(
            {
                "name": m.name,
                "role": m.role,
                "state": state.state if state else ("ALIVE" if info else "UNKNOWN"),
                "restarts": state.num_restarts if state else None,
                "pid": state.pid if state else (info or {}).get("actor_pid"),
                "node": (info or {}).get("node_ip"),
                "address": (info or {}).get("address") or (info or {}).get("port"),
                "info": info,
            }
        )
    if args.json:
        print(json.dumps({"deployment": args.name, "namespace": args.namespace, "actors": rows}, indent=2))
        return 0 if rows else 1
    if not rows:
        print(f"pdmesh: no deployment {args.name!r} in namespace {args.namespace!r}", file=sys.stderr)
        return 1
    print(f"{'ACTOR':<28} {'STATE':<12} {'RESTARTS':>8}  {'NODE':<16} SERVES")
    for r in rows:
        info = r["info"] or {}
        if r["role"] == "router":
            counts = ", ".join(f"{len(a)} {role}" for role, a in info.get("workers", {}).items())
            serves = (
                f"port {info['port']} ({'ready' if info.get('ready') else 'not ready'}; {counts})"
                if info
                else "-"
            )
        else:
            serves = info.get("address") or ("starting" if info else "-")
        restarts = "-" if r["restarts"] is None else str(r["restarts"])
        print(f"{r['name']:<28} {r['state']:<12} {restarts:>8}  {r['node'] or '-':<16} {serves}")
    return 0


# ---- down ----------------------------------------------------------------------------------------------------
def _down(args: argparse.Namespace) -> int:
    removed = _remove(args.name, args.namespace, args.drain_timeout)
    if not removed:
        print(f"pdmesh: no deployment {args.name!r} in namespace {args.namespace!r}", file=sys.stderr)
        return 1
    return 0


def _remove(deployment: str, namespace: str, drain_s: float, quiet: bool = False) -> int:
    """Stop the routers, drain the workers, then kill the actors and remove the placement groups; how many
    actors and groups were removed."""
    import ray
    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import get_placement_group

    found = members(deployment, namespace)
    routers = [m for m in found if m.role == "router"]
    workers = [m for m in found if m.role != "router"]
    states = _states(namespace)
    for group in (routers, workers):  # routers first: no new requests reach a draining worker
        # only actors that run can stop gracefully (a call to one still pending or restarting would wait for it)
        running = [m for m in group if getattr(states.get(m.name), "state", "ALIVE") == "ALIVE"]
        stops = [m.handle.stop.remote(*([drain_s] if m.role != "router" else [])) for m in running]
        deadline = time.monotonic() + drain_s + 30.0
        for ref in stops:
            with contextlib.suppress(ray.exceptions.RayError):
                ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
        for m in group:
            ray.kill(m.handle, no_restart=True)
            if not quiet:
                _say(f"{m.name}: removed")
    groups = 0
    prefix = f"{deployment}-"
    for entry in placement_group_table().values():
        name = entry.get("name", "")
        if entry.get("state") != "REMOVED" and name.startswith(prefix) and name.endswith("-pg"):
            if parse_actor_name(deployment, name.removesuffix("-pg")) is None:
                continue
            try:
                remove_placement_group(get_placement_group(name))
                groups += 1
            except ValueError:  # another namespace's group of that name
                continue
    deadline = time.monotonic() + 30.0
    while members(deployment, namespace) and time.monotonic() < deadline:
        time.sleep(0.2)
    if not quiet and (found or groups):
        _say(f"deployment {deployment!r} removed ({len(found)} actors, {groups} placement groups)")
    return len(found) + groups
