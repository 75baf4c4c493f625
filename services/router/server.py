"""Run the router: `pdmesh router --model DIR --prefill HOST:PORT --decode HOST:PORT [...]`."""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import signal
import socket
import time

from services.router.app import KubernetesDiscovery, RayDiscovery, RouterConfig, create_app
from services.router.pipeline import DispatchOptions
from services.router.policies import POLICIES
from services.router.tool_calls import FORMATS

log = logging.getLogger("pdmesh.router")


def _addresses(values: list[str] | None) -> tuple[str, ...]:
    return tuple(a.strip() for v in values or [] for a in v.split(",") if a.strip())


def add_router_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="checkpoint directory for the tokenizer (default: the embedded tiny model)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="router processes serving this port (each a full replica of the mesh; default 1)",
    )
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        help="share the port with other router processes (SO_REUSEPORT; the kernel spreads connections)",
    )
    found = parser.add_argument_group(
        "workers (static addresses, DNS names re-resolved, or pods watched in Kubernetes; see docs/serving.md)"
    )
    found.add_argument(
        "--prefill",
        action="append",
        help="prefill workers: HOST:PORT[,HOST:PORT...] or dns://NAME:PORT (e.g. a headless Service)",
    )
    found.add_argument("--decode", action="append", help="decode workers (same forms)")
    found.add_argument("--colocated", action="append", help="colocated workers (same forms)")
    found.add_argument("--dns-interval", type=float, default=5.0, help="seconds between DNS lookups")
    found.add_argument("--dns-server", help="HOST[:PORT] of the DNS server (default: the system's)")
    found.add_argument(
        "--kubernetes-selector",
        help="watch the pods with these labels (e.g. app.kubernetes.io/instance=pdmesh) through the "
        "Kubernetes API; each pod's role from its pdmesh.io/role label",
    )
    found.add_argument("--kubernetes-namespace", help="default: the router's own namespace")
    found.add_argument("--kubernetes-port", type=int, default=50051, help="the workers' gRPC port")
    found.add_argument("--kubernetes-role-label", default="pdmesh.io/role")
    found.add_argument(
        "--ray-deployment",
        help="follow the worker actors `pdmesh ray up --name NAME` started (NAME-prefill-0, ...) on a Ray cluster",
    )
    found.add_argument("--ray-address", default="auto", help="the Ray cluster (with --ray-deployment)")
    found.add_argument("--ray-namespace", default="pdmesh", help="the actors' Ray namespace")
    parser.add_argument(
        "--served-model-name", help="model name clients use (default: the checkpoint folder name)"
    )
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    parser.add_argument(
        "--metrics-need-key", action="store_true", help="with --api-key: /metrics requires the key too"
    )
    rel = parser.add_argument_group("limits and reliability")
    rel.add_argument(
        "--max-in-flight", type=int, default=4096, help="requests served at once; beyond, they wait"
    )
    rel.add_argument(
        "--queue-timeout",
        type=float,
        default=5.0,
        help="seconds a request beyond --max-in-flight waits for a slot before a 429 (default 5)",
    )
    rel.add_argument(
        "--request-timeout",
        type=float,
        help="deadline of every request in seconds (clients may ask for less with the x-pdmesh-timeout "
        "header); default none",
    )
    rel.add_argument("--max-prompts", type=int, default=64, help="prompts in one /v1/completions request")
    rel.add_argument(
        "--retries",
        type=int,
        default=2,
        help="attempts on other workers when one fails before the first token (default 2)",
    )
    rel.add_argument(
        "--breaker-threshold",
        type=int,
        default=3,
        help="failed requests in a row that cut a worker off (circuit breaker; default 3)",
    )
    rel.add_argument(
        "--breaker-cooldown",
        type=float,
        default=5.0,
        help="seconds before a cut-off worker is probed with one request (doubles per failed probe)",
    )
    parser.add_argument(
        "--kv-checksum", action="store_true", help="verify every KV transfer end to end (debug)"
    )
    parser.add_argument(
        "--admission-timeout", type=float, default=30.0, help="seconds to wait for KV capacity"
    )
    parser.add_argument("--prefill-timeout", type=float, default=600.0)
    parser.add_argument(
        "--token-timeout", type=float, default=120.0, help="longest silence of a token stream"
    )
    parser.add_argument(
        "--worker-wait", type=float, default=300.0, help="seconds to wait for workers at start"
    )
    parser.add_argument(
        "--tool-call-parser",
        default="auto",
        choices=FORMATS,
        help="how tool calls are read from the model's output (default auto: from the chat template; hermes: "
        "Qwen2.5/Qwen3 <tool_call> JSON; llama3_json: Llama 3.x JSON; none: never)",
    )
    parser.add_argument(
        "--policy",
        default="kv_aware",
        choices=POLICIES,
        help="how workers are picked (default kv_aware: uncached prompt tokens + queued work)",
    )


def router_config(args: argparse.Namespace, model: str) -> RouterConfig:
    for name in ("max_in_flight", "max_prompts", "breaker_threshold", "workers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("queue_timeout", "retries", "breaker_cooldown"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must not be negative")
    if args.request_timeout is not None and args.request_timeout <= 0:
        raise ValueError("--request-timeout must be a positive number of seconds")
    kubernetes = None
    if args.kubernetes_selector:
        from services.router.discovery_kubernetes import parse_selector

        parse_selector(args.kubernetes_selector)  # a malformed selector is a usage error, now
        kubernetes = KubernetesDiscovery(
            args.kubernetes_selector,
            args.kubernetes_namespace,
            args.kubernetes_port,
            args.kubernetes_role_label,
        )
    ray = None
    if args.ray_deployment:
        ray = RayDiscovery(args.ray_deployment, args.ray_namespace, args.ray_address)
    return RouterConfig(
        model=model,
        prefill=_addresses(args.prefill),
        decode=_addresses(args.decode),
        colocated=_addresses(args.colocated),
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        metrics_need_key=args.metrics_need_key,
        max_in_flight=args.max_in_flight,
        queue_timeout_s=args.queue_timeout,
        request_timeout_s=args.request_timeout,
        max_prompts=args.max_prompts,
        worker_wait_s=args.worker_wait,
        policy=args.policy,
        tool_call_parser=args.tool_call_parser,
        breaker_threshold=args.breaker_threshold,
        breaker_cooldown_s=args.breaker_cooldown,
        dns_interval_s=args.dns_interval,
        dns_server=args.dns_server,
        kubernetes=kubernetes,
        ray=ray,
        dispatch=DispatchOptions(
            prefill_timeout_s=args.prefill_timeout,
            token_timeout_s=args.token_timeout,
            admission_timeout_s=args.admission_timeout,
            kv_checksum=args.kv_checksum,
            retries=args.retries,
        ),
    )


def run_router(
    config: RouterConfig,
    host: str,
    port: int,
    log_level: str = "warning",
    workers: int = 1,
    reuse_port: bool = False,
) -> None:
    """Serve until stopped; with workers > 1, as that many processes on one port (each a replica of the mesh)."""
    create_app(config)  # NOTE: a configuration error stops here, once, before any process starts
    if workers == 1:
        print(f"pdmesh router listening on http://{host}:{port} ({config.model_name})", flush=True)
        _serve(config, host, port, log_level, reuse_port)
        return
    print(
        f"pdmesh router listening on http://{host}:{port} ({config.model_name}, {workers} processes)",
        flush=True,
    )
    _supervise(config, host, port, log_level, workers)


def _serve(config: RouterConfig, host: str, port: int, log_level: str, reuse_port: bool) -> None:
    import uvicorn

    if not logging.getLogger().handlers:  # a spawned router process: log as the command line does
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(config)
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    )
    if not reuse_port:
        server.run()
        return
    server.run(sockets=[reuse_port_socket(host, port)])


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening address several router processes share (SO_REUSEPORT: the kernel spreads connections)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _supervise(config: RouterConfig, host: str, port: int, log_level: str, workers: int) -> None:
    """N router processes sharing the port; one that dies is started again (the others keep serving)."""
    ctx = multiprocessing.get_context("spawn")

    def start() -> multiprocessing.process.BaseProcess:
        p = ctx.Process(target=_serve, args=(config, host, port, log_level, True), daemon=False)
        p.start()
        return p

    procs = [start() for _ in range(workers)]
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while not stopping:
            for i, p in enumerate(procs):
                if not p.is_alive() and not stopping:
                    log.warning("router process %d exited (code %s); starting it again", p.pid, p.exitcode)
                    time.sleep(1.0)
                    procs[i] = start()
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: uvicorn drains, then exits
        for p in procs:
            p.join(timeout=15)
            if p.is_alive():
                p.kill()
