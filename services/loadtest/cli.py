"""`pdmesh bench`: load-test an OpenAI-compatible endpoint and write the results to --out."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import httpx

from services.loadtest import plots, report
from services.loadtest.arrival import Arrival
from services.loadtest.client import Target
from services.loadtest.metrics import SLO, parse_percentiles, summarize
from services.loadtest.runner import RunResult, run
from services.loadtest.sweep import run_sweep
from services.loadtest.workloads import WORKLOADS, LengthRange, WorkloadSpec


class BenchError(ValueError):
    pass


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000 (OpenAI-compatible)")
    p.add_argument("--model", help="model name to request (default: the first of GET /v1/models)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--api-key")
    p.add_argument("--tokenizer", help="the model's checkpoint directory, for exact token lengths")
    p.add_argument("--dataset", default="random", choices=WORKLOADS)
    p.add_argument("--dataset-path", help="ShareGPT-format JSON file (--dataset sharegpt)")
    p.add_argument("--input-len", default="256", help="prompt tokens, N or LOW:HIGH (random, per turn)")
    p.add_argument("--output-len", default="128", help="output tokens, N or LOW:HIGH")
    p.add_argument("--prefix-len", type=int, default=512, help="shared system prompt tokens (shared-prefix)")
    p.add_argument("--num-groups", type=int, default=4, help="distinct shared prefixes (shared-prefix)")
    p.add_argument("--turns", type=int, default=3, help="user turns per conversation (multi-turn)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, help="keep N requests in flight")
    load.add_argument("--rate", type=float, help="requests per second (Poisson unless --burstiness)")
    load.add_argument(
        "--sweep", action="store_true", help="synchronous, max, then rates between until saturation"
    )
    p.add_argument(
        "--burstiness", type=float, default=1.0, help="gamma shape of inter-arrival gaps (1 = Poisson)"
    )
    p.add_argument("--max-concurrency", type=int, help="with --rate: cap requests in flight")
    p.add_argument("--sweep-steps", type=int, default=4)
    p.add_argument(
        "--saturation", type=float, default=0.9, help="sweep stops once served/offered rate < this"
    )
    p.add_argument("--num-prompts", type=int, default=100, help="conversations per run")
    p.add_argument("--duration", type=float, help="stop starting requests after this many seconds")
    p.add_argument("--warmup", type=int, default=2, help="requests sent first and left out of the results")
    p.add_argument(
        "--slo", help="goodput SLOs, e.g. ttft_ms=200,tpot_ms=50 (keys: ttft_ms tpot_ms itl_ms e2el_ms)"
    )
    p.add_argument("--percentiles", default="50,90,95,99")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", action="store_true", help="let answers end early at EOS")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for summary.json, records.csv, report.md, plots")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _probe(url: str, api_key: str | None) -> tuple[list[str], bool]:
    """The served model names, and whether the server is a pdmesh router."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        models = httpx.get(f"{url}/v1/models", headers=headers, timeout=10)
    except httpx.HTTPError as e:
        raise BenchError(f"cannot reach {url}: {e}. Is the server up, and is the URL right?") from None
    if models.status_code != 200:
        raise BenchError(f"{url}/v1/models answered {models.status_code}: {models.text[:200]}")
    names = [m["id"] for m in models.json().get("data", [])]
    try:
        health = httpx.get(f"{url}/health", timeout=10).json()
        is_pdmesh = (
            isinstance(health, dict) and "workers" in health and health.get("mode") in ("pd", "colocated")
        )
    except (httpx.HTTPError, ValueError):
        is_pdmesh = False
    return names, is_pdmesh


def _tokenizer(args: argparse.Namespace, model: str):  # type: ignore[no-untyped-def]
    from services.common.errors import CheckpointError
    from services.common.tokenizer import Tokenizer

    path = args.tokenizer
    if path is None and model == "tiny-llama":
        from services.engine.tiny_model import default_model_dir

        path = str(default_model_dir())
    if path is None:
        if args.dataset == "sharegpt":
            return None
        raise BenchError(
            f"the {args.dataset} dataset needs the model's tokenizer for exact lengths: pass "
            "--tokenizer DIR (the checkpoint directory)"
        )
    try:
        return Tokenizer(path)
    except CheckpointError as e:
        raise BenchError(f"--tokenizer: {e}") from e


def run_bench(args: argparse.Namespace) -> int:
    from services.loadtest.metrics import MetricError
    from services.loadtest.workloads import WorkloadError

    try:
        return asyncio.run(_bench(args))
    except (BenchError, MetricError, WorkloadError, ValueError) as e:
        print(f"pdmesh bench: error: {e}", file=sys.stderr)
        return 2


async def _bench(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/").removesuffix("/v1")
    percentiles = parse_percentiles(args.percentiles)
    slo = SLO.parse(args.slo)
    spec = WorkloadSpec(
        name=args.dataset,
        path=args.dataset_path,
        input_len=LengthRange.parse(args.input_len, "--input-len"),
        output_len=LengthRange.parse(args.output_len, "--output-len"),
        prefix_len=args.prefix_len,
        num_groups=args.num_groups,
        turns=args.turns,
        token_ids=args.endpoint == "completions",
    )
    if args.dataset == "sharegpt" and not args.dataset_path:
        raise BenchError("--dataset sharegpt needs --dataset-path FILE")
    if args.dataset_path and not Path(args.dataset_path).exists():
        raise BenchError(f"--dataset-path {args.dataset_path}: no such file")
    names, is_pdmesh = _probe(url, args.api_key)
    model = args.model or (names[0] if names else None)
    if model is None:
        raise BenchError(f"{url}/v1/models lists no model; pass --model")
    tokenizer = _tokenizer(args, model)
    target = Target(
        url,
        model,
        args.endpoint,
        args.api_key,
        is_pdmesh,
        not args.no_ignore_eos,
        args.temperature,
        args.timeout,
    )
    workload = spec.build(args.num_prompts, tokenizer, args.seed)
    warmup = spec.build(args.warmup, tokenizer, args.seed + 1) if args.warmup else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[tuple[str, RunResult, dict[str, Any]]] = []

    async def measure(arrival: Arrival, label: str) -> dict[str, Any]:
        result = await run(target, workload, arrival, warmup, args.seed, args.duration, not args.quiet, label)
        summary = summarize(result, percentiles, slo)
        results.append((label, result, summary))
        print(report.table(summary, label), flush=True)
        return summary

    if args.sweep:
        points = await run_sweep(measure, args.sweep_steps, args.saturation, args.burstiness)
        saturated = any(p.saturated for p in points)
        print(
            f"sweep: {len(points)} points; " + ("stopped at saturation" if saturated else "never saturated")
        )
    else:
        rate = args.rate if args.rate is not None else math.inf
        concurrency = args.concurrency if args.concurrency is not None else args.max_concurrency
        if args.rate is None and concurrency is None:
            concurrency = 1
        arrival = Arrival(rate=rate, burstiness=args.burstiness, concurrency=concurrency)
        await measure(arrival, arrival.describe())

    meta = {
        "url": url,
        "model": model,
        "endpoint": args.endpoint,
        "server": "pdmesh" if is_pdmesh else "openai",
        "workload": f"{args.dataset} (input {args.input_len}, output {args.output_len}, {args.num_prompts} prompts)",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "pdmesh bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
    }
    points = [(label, summary) for label, _, summary in results]
    report.write_json(
        out / "summary.json",
        {
            "meta": meta,
            "runs": [
                {"label": label, "summary": s, "records": [r.to_json() for r in res.records]}
                for label, res, s in results
            ],
        },
    )
    report.write_csv(out / "records.csv", [r for _, res, _ in results for r in res.records])
    written: list[str] = []
    if not args.no_plots:
        written.append(
            plots.latency_cdfs(out / "latency_cdf.png", [(lbl, res.records) for lbl, res, _ in results]).name
        )
        if len(points) > 1:
            written.append(plots.throughput_latency(out / "throughput_latency.png", points).name)
        breakdown = plots.ttft_breakdown(out / "ttft_breakdown.png", points)
        if breakdown is not None:
            written.append(breakdown.name)
    (out / "report.md").write_text(report.markdown(meta, points, written))
    print(f"results in {out}/: summary.json, records.csv, report.md" + "".join(f", {w}" for w in written))
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from services.loadtest.compare import CompareError, compare

    try:
        print(compare(args.a, args.b))
    except CompareError as e:
        print(f"pdmesh bench compare: error: {e}", file=sys.stderr)
        return 2
    return 0
