"""The `pdmesh` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from services.common.errors import CheckpointError, RequestError


def _generate(args: argparse.Namespace) -> None:
    from services.engine import LLM, SamplingParams
    from services.engine.tiny_model import default_model_dir

    model = args.model or str(default_model_dir())
    llm = LLM(model, device=args.device, dtype=args.dtype, progress=not args.json)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        stop=tuple(args.stop or ()),
        ignore_eos=args.ignore_eos,
    )
    if args.chat:
        prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in args.prompt]
    else:
        prompts = [llm.tokenizer.encode(p) for p in args.prompt]
    for prompt, out in zip(args.prompt, llm.generate(prompts, params), strict=True):
        if args.json:
            record = {
                "prompt": prompt,
                "text": out.text,
                "token_ids": out.token_ids,
                "finish_reason": out.finish_reason,
                "prompt_tokens": len(out.prompt_token_ids),
            }
            print(json.dumps(record))
        else:
            print(f"--- {prompt!r} ({out.finish_reason}, {len(out.token_ids)} tokens)\n{out.text}")


def _make_tiny_model(args: argparse.Namespace) -> None:
    from services.engine.tiny_model import make_tiny_model

    path = make_tiny_model(args.dir, args.arch, seed=args.seed)
    print(f"wrote a tiny random {args.arch} checkpoint to {path}")


def _worker(role: str) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        import asyncio
        import importlib

        from services.engine.tiny_model import default_model_dir
        from services.worker.server import engine_config, serve, transfer_options

        module = importlib.import_module(f"services.{role}.attach")  # the role's service, composed here
        model = args.model or str(default_model_dir())
        config = engine_config(args, role, model)
        make_rank = getattr(module, "make_rank", None)
        options = transfer_options(args)
        asyncio.run(
            serve(
                config,
                args.host,
                args.port,
                options,
                module.attach,
                make_rank,
                args.drain_timeout,
                args.address_file,
            )
        )

    return run


def _router(args: argparse.Namespace) -> None:
    from services.router.server import router_config, run_router

    if (
        args.model
    ):  # NOTE: the router imports nothing of the engine (no torch) unless it must build the tiny model
        model = args.model
    else:
        from services.engine.tiny_model import default_model_dir

        model = str(default_model_dir())
    config = router_config(args, model)
    run_router(config, args.host, args.port, args.log_level.lower(), args.workers, args.reuse_port)


def _up(args: argparse.Namespace) -> None:
    from services.up import run_cluster

    sys.exit(run_cluster(args))


def _ray(args: argparse.Namespace) -> None:
    from services.raycluster.launch import run_ray

    sys.exit(run_ray(args))


def _bench(args: argparse.Namespace) -> None:
    from services.loadtest.cli import run_bench

    sys.exit(run_bench(args))


def _bench_compare(argv: list[str]) -> None:
    from services.loadtest.cli import run_compare

    parser = argparse.ArgumentParser(prog="pdmesh bench compare", description="two bench runs side by side")
    parser.add_argument("a", help="summary.json of run A")
    parser.add_argument("b", help="summary.json of run B")
    sys.exit(run_compare(parser.parse_args(argv)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdmesh", description="Prefill/decode-disaggregated LLM serving.")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default) or ERROR")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate text offline with the engine")
    gen.add_argument(
        "--model", help="local Hugging Face checkpoint directory (default: the embedded tiny model)"
    )
    gen.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    gen.add_argument(
        "--chat", action="store_true", help="wrap each prompt as a user message in the chat template"
    )
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="a stop string; repeatable")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    gen.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    gen.add_argument("--json", action="store_true", help="print one JSON record per prompt")
    gen.set_defaults(func=_generate)

    from services.router.server import add_router_arguments
    from services.up import add_up_arguments
    from services.worker.options import add_worker_arguments

    up = sub.add_parser(
        "up", help="start a local cluster: a router and prefill + decode (or colocated) workers"
    )
    add_up_arguments(up)
    up.set_defaults(func=_up)

    from services.raycluster.launch import add_ray_arguments

    ray = sub.add_parser("ray", help="run pdmesh on a Ray cluster: `pdmesh ray up|status|down`")
    add_ray_arguments(ray)
    ray.set_defaults(func=_ray)

    from services.loadtest.cli import add_bench_arguments

    bench = sub.add_parser(
        "bench",
        help="load-test an OpenAI-compatible endpoint (`pdmesh bench compare A.json B.json` compares runs)",
    )
    add_bench_arguments(bench)
    bench.set_defaults(func=_bench)

    router = sub.add_parser("router", help="run the OpenAI-compatible router in front of workers")
    add_router_arguments(router)
    router.set_defaults(func=_router)

    for role, text in (
        ("prefill", "run a prefill worker (gRPC): chunked prefill, KV pushed to decode workers"),
        ("decode", "run a decode worker (gRPC): receives KV, streams tokens"),
        ("colocated", "run a colocated worker (gRPC): prefill and decode in one engine"),
    ):
        worker = sub.add_parser(role, help=text)
        add_worker_arguments(worker)
        worker.set_defaults(func=_worker(role))

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random checkpoint (for tests and demos)")
    tiny.add_argument("dir")
    tiny.add_argument("--arch", default="llama", choices=["llama", "qwen2", "qwen3"])
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_make_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["bench", "compare"]:
        _bench_compare(argv[2:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except (CheckpointError, RequestError, ValueError) as e:
        print(f"pdmesh {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
