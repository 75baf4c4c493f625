"""Run the router: `pdmesh router --model DIR --prefill HOST:PORT --decode HOST:PORT [...]`."""

from __future__ import annotations

import argparse

from services.router.app import RouterConfig, create_app
from services.router.pipeline import DispatchOptions
from services.router.policies import POLICIES


def _addresses(values: list[str] | None) -> tuple[str, ...]:
    return tuple(a.strip() for v in values or [] for a in v.split(",") if a.strip())


def add_router_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="checkpoint directory for the tokenizer (default: the embedded tiny model)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--prefill", action="append", help="prefill worker address(es), HOST:PORT[,HOST:PORT...]"
    )
    parser.add_argument("--decode", action="append", help="decode worker address(es)")
    parser.add_argument("--colocated", action="append", help="colocated worker address(es)")
    parser.add_argument(
        "--served-model-name", help="model name clients use (default: the checkpoint folder name)"
    )
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    parser.add_argument(
        "--metrics-need-key", action="store_true", help="with --api-key: /metrics requires the key too"
    )
    parser.add_argument(
        "--max-in-flight", type=int, default=4096, help="requests served at once; beyond: 429"
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
        "--policy",
        default="kv_aware",
        choices=POLICIES,
        help="how workers are picked (default kv_aware: uncached prompt tokens + queued work)",
    )


def router_config(args: argparse.Namespace, model: str) -> RouterConfig:
    return RouterConfig(
        model=model,
        prefill=_addresses(args.prefill),
        decode=_addresses(args.decode),
        colocated=_addresses(args.colocated),
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        metrics_need_key=args.metrics_need_key,
        max_in_flight=args.max_in_flight,
        worker_wait_s=args.worker_wait,
        policy=args.policy,
        dispatch=DispatchOptions(
            prefill_timeout_s=args.prefill_timeout,
            token_timeout_s=args.token_timeout,
            admission_timeout_s=args.admission_timeout,
            kv_checksum=args.kv_checksum,
        ),
    )


def run_router(config: RouterConfig, host: str, port: int, log_level: str = "warning") -> None:
    import uvicorn

    app = create_app(config)
    print(f"pdmesh router listening on http://{host}:{port} ({config.model_name})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
