"""End-to-end serving: PD disaggregation (a run per KV transport) against colocated serving on the same GPUs.

    python bench/serving.py                                   # Llama-3.1-8B-shaped random checkpoint, 1 GPU
    python bench/serving.py --model DIR --gpus 2 --protocols auto,tcp,rdma
    python bench/serving.py --tiny --out /tmp/serving         # CPU smoke test: the embedded tiny model
    python bench/serving.py --gpus 2 --workloads long8k,chat --rates 0.5,1,2,4   # goodput by request rate

Each configuration is a fresh `pdmesh up` cluster (colocated first: it is the baseline) driven by the same
`pdmesh bench` workloads, closed loop (with --rates: open loop at each rate, Poisson arrivals, the workload's
concurrency as the cap); warm-up requests are left out, as `pdmesh bench` does. With one GPU the
prefill and decode workers share it (`pdmesh up` splits its memory between them). Without --model the model is
Llama-3.1-8B's shape with random bf16 weights (`--load-format dummy`: a config and a tokenizer, no weights on
disk). One Markdown
table goes to stdout and to --out, with results.json (every number), and every component's log.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.up import add_up_arguments, free_port  # stdlib only: the driver itself needs no torch

ROOT = Path(__file__).resolve().parents[1]
HOME = Path(os.environ.get("PDMESH_HOME", Path.home() / ".cache" / "pdmesh"))
PHASES = ("queue_ms", "prefill_ms", "transfer_ms", "first_decode_ms", "router_ms", "client_network_ms")
Results = dict[str, dict[str, dict[str, Any]]]  # configuration -> workload -> `pdmesh bench` summary


@dataclass(frozen=True)
class Workload:
    name: str
    input_len: int
    output_len: int
    concurrency: int
    requests: int
    seed: int  # distinct per workload: equal seeds draw equal prompt prefixes (prefix-cache hits across runs)
    prefix_len: int = 0  # > 0: the shared-prefix dataset, 4 groups sharing a system prompt of this length
    input_max: int = 0  # > input_len: lengths drawn uniformly from [input_len, input_max]
    output_max: int = 0
    rate: float = (
        0.0  # > 0: open loop, Poisson arrivals at this many requests per second (concurrency caps them)
    )

    @property
    def label(self) -> str:
        shared = f"{self.prefix_len} shared + " if self.prefix_len else ""
        load = f"{self.rate:g}/s" if self.rate else str(self.concurrency)
        return f"{shared}{_span(self.input_len, self.input_max)}/{_span(self.output_len, self.output_max)} @{load}"

    def scaled(self, scale: int) -> Workload:
        return replace(
            self,
            input_len=max(1, self.input_len // scale),
            output_len=max(2, self.output_len // scale),
            input_max=self.input_max // scale,
            output_max=self.output_max // scale,
            prefix_len=self.prefix_len // scale,
            requests=max(4, self.requests // scale),
        )

    def at_rate(self, rate: float) -> Workload:
        return replace(self, name=f"{self.name}@{rate:g}", rate=rate)

    def bench_args(self) -> list[str]:
        dataset = ["shared-prefix", "--prefix-len", str(self.prefix_len)] if self.prefix_len else ["random"]
        lengths = ["--input-len", _range(self.input_len, self.input_max)]
        lengths += ["--output-len", _range(self.output_len, self.output_max)]
        if self.rate:
            load = ["--rate", f"{self.rate:g}", "--max-concurrency", str(self.concurrency)]
        else:
            load = ["--concurrency", str(self.concurrency)]
        return [
            "--dataset",
            *dataset,
            *lengths,
            *load,
            "--num-prompts",
            str(self.requests),
            "--seed",
            str(self.seed),
        ]


def _range(low: int, high: int) -> str:
    return f"{low}:{high}" if high > low else str(low)


def _span(low: int, high: int) -> str:
    return f"{low}-{high}" if high > low else str(low)


WORKLOADS = {
    "long": Workload("long", 4096, 128, 8, 64, seed=1000),
    "short": Workload("short", 1024, 256, 32, 128, seed=2000),
    "prefix": Workload("prefix", 512, 128, 16, 128, seed=3000, prefix_len=2048),
    # PD's case: long prompts, short answers
    "long8k": Workload("long8k", 8192, 256, 32, 64, seed=4000),
    # chat: prompts and answers of spread lengths, as in ShareGPT conversations (no dataset file needed)
    "chat": Workload("chat", 64, 32, 64, 256, seed=5000, input_max=2048, output_max=512),
}


class UsageError(ValueError):
    pass


class ClusterError(RuntimeError):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint directory (default: a Llama-3.1-8B-shaped random one)")
    src.add_argument("--tiny", action="store_true", help="the embedded tiny model on CPU (smoke test)")
    ap.add_argument("--cache-dir", help="where the random checkpoint is kept (default: $PDMESH_HOME/bench)")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs (default 1: prefill and decode share it)")
    ap.add_argument("--prefill", type=int, help="prefill workers (default: half the GPUs, at least 1)")
    ap.add_argument("--decode", type=int, help="decode workers (default: the other half, at least 1)")
    ap.add_argument("--protocols", default="auto,tcp", help="KV transports, a PD run each (default auto,tcp)")
    ap.add_argument("--kv-checksum", action="store_true", help="PD runs verify every KV transfer (debug)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"subset of {','.join(WORKLOADS)}")
    ap.add_argument("--requests", help="requests per workload, e.g. 64,128,128 (default: those / --scale)")
    ap.add_argument(
        "--rates",
        help="requests per second, e.g. 0.5,1,2,4: each workload open loop at each rate (its concurrency the cap) "
        "instead of closed loop",
    )
    ap.add_argument("--scale", type=int, help="divide lengths and request counts (default 1; --tiny: 16)")
    ap.add_argument("--warmup", type=int, default=4, help="warm-up requests per workload, left out")
    ap.add_argument("--slo", help="goodput SLO (default ttft_ms=1000,tpot_ms=50; --tiny: 10x looser)")
    ap.add_argument("--up-args", default="", help="more `pdmesh up` flags for every cluster, quoted")
    ap.add_argument("--startup-timeout", type=float, default=900.0, help="seconds a cluster may take")
    ap.add_argument("--run-timeout", type=float, default=3600.0, help="seconds one `pdmesh bench` may take")
    ap.add_argument("--out", help="results folder (default $PDMESH_HOME/results/serving-<time>)")
    args = ap.parse_args(argv)
    args.scale = args.scale or (16 if args.tiny else 1)
    args.slo = args.slo or ("ttft_ms=10000,tpot_ms=500" if args.tiny else "ttft_ms=1000,tpot_ms=50")
    args.out = Path(args.out or HOME / "results" / time.strftime("serving-%Y%m%d-%H%M%S"))
    return args


def check_args(args: argparse.Namespace) -> tuple[list[Workload], list[str], str]:
    """The workloads, the transports, and the hardware in words; UsageError for what cannot run."""
    if args.scale < 1 or args.gpus < 1 or args.warmup < 0:
        raise UsageError("--scale and --gpus must be at least 1, --warmup at least 0")
    names = [w for w in args.workloads.split(",") if w]
    if not names or any(w not in WORKLOADS for w in names):
        raise UsageError(f"--workloads takes a subset of {','.join(WORKLOADS)}, got '{args.workloads}'")
    workloads = [WORKLOADS[w].scaled(args.scale) for w in names]
    if args.requests:
        counts = [int(n) for n in args.requests.split(",") if n.isdigit()]
        if len(counts) != len(workloads) or min(counts) < 1:
            raise UsageError(f"--requests takes {len(workloads)} positive counts (one per workload)")
        workloads = [replace(w, requests=n) for w, n in zip(workloads, counts, strict=True)]
    if args.rates:
        try:
            rates = [float(r) for r in args.rates.split(",") if r]
        except ValueError:
            rates = []
        if not rates or min(rates) <= 0:
            raise UsageError(f"--rates takes positive requests per second, e.g. 0.5,1,2, got '{args.rates}'")
        workloads = [w.at_rate(r) for w in workloads for r in rates]
    up = argparse.ArgumentParser()
    add_up_arguments(up)
    known = next(a.choices for a in up._actions if a.dest == "transfer_protocol") or ()
    protocols = [p for p in args.protocols.split(",") if p]
    unknown = [p for p in protocols if p not in known]
    if unknown:
        raise UsageError(f"--protocols: `pdmesh up` accepts {', '.join(known)}; not {', '.join(unknown)}")
    if args.model and not (Path(args.model) / "config.json").exists():
        raise UsageError(f"--model {args.model}: no config.json there; give a Hugging Face checkpoint folder")
    if args.tiny:
        return workloads, protocols, "CPU"
    import torch

    if torch.cuda.device_count() < args.gpus:
        found = torch.cuda.device_count()
        raise UsageError(f"--gpus {args.gpus}: {found} CUDA GPU(s) here; use --tiny on a machine without")
    return workloads, protocols, f"{args.gpus}x {torch.cuda.get_device_name(0)}"


def build_checkpoint(path: Path) -> Path:
    """Llama-3.1-8B's config and a tokenizer; the workers draw random bf16 weights (`--load-format dummy`)."""
    if (path / "config.json").exists():
        return path
    from tokenizers import Tokenizer, models, pre_tokenizers

    from bench.engine import LLAMA_8B as c

    tmp = path.with_name(f".{path.name}-partial")
    tmp.mkdir(parents=True, exist_ok=True)
    # a word-level vocabulary ("t0 t1 ...") whose text re-encodes to the same ids: exact prompt lengths
    tok = Tokenizer(models.WordLevel({f"t{n}": n for n in range(c["vocab_size"])}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos, eos = f"t{c['bos_token_id']}", f"t{c['eos_token_id']}"
    tok.add_special_tokens([bos, eos])
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "eos_token": eos}))
    # NOTE: written last: its presence marks a complete directory
    (tmp / "config.json").write_text(json.dumps(c, indent=2))
    os.replace(tmp, path)
    return path


def progress(line: str) -> None:
    print(f"serving: {line}", file=sys.stderr, flush=True)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def spawn(argv: list[str], log: IO[bytes], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """A child in its own process group, so that it and whatever it starts end together."""
    return subprocess.Popen(
        argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class Cluster:
    """One `pdmesh up` in its own process group; leaving the `with` ends it and every worker it started."""

    def __init__(self, name: str, up_args: list[str], out: Path, env: Mapping[str, str]) -> None:
        self.name, self.out, self.port = name, out, free_port()
        self.url, self.log = f"http://127.0.0.1:{self.port}", out / "up.log"
        argv = [sys.executable, "-m", "services.cli", "up", *up_args, "--port", str(self.port)]
        out.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as f:
            self.proc = spawn([*argv, "--log-dir", str(out / "logs")], f, env)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # up stops its workers itself
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
        kill_group(self.proc)  # what is left: a hung up, a worker that outlived it

    def wait_ready(self, timeout_s: float) -> None:
        started = time.monotonic()
        while not self.healthy():
            self.check()
            if time.monotonic() > started + timeout_s:
                raise ClusterError(
                    f"{self.name}: not ready after {timeout_s:.0f} s; {self.log}:\n{tail(self.log)}"
                )
            time.sleep(1.0)
        took = time.monotonic() - started
        progress(f"{self.name}: ready in {took:.0f} s at {self.url} (logs: {self.out / 'logs'})")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return json.loads(r.read()).get("status") == "ok"
        except (OSError, ValueError):
            return False

    def check(self) -> None:
        if self.proc.poll() is not None:
            code = self.proc.returncode
            raise ClusterError(
                f"{self.name}: `pdmesh up` exited with code {code}; {self.log}:\n{tail(self.log)}"
            )


def run_bench(cluster: Cluster, w: Workload, args: argparse.Namespace, model: Path | None) -> dict[str, Any]:
    out = cluster.out / w.name
    argv = [sys.executable, "-m", "services.cli", "bench", "--url", cluster.url, *w.bench_args()]
    argv += ["--warmup", str(args.warmup), "--slo", args.slo, "--out", str(out), "--no-plots", "--quiet"]
    argv += ["--tokenizer", str(model)] if model else []
    out.mkdir(parents=True, exist_ok=True)
    progress(f"{cluster.name}: {w.name} ({w.label}, {w.requests} requests)")
    with open(out / "bench.log", "wb") as f:
        proc = spawn(argv, f, os.environ)
        try:
            code = proc.wait(timeout=args.run_timeout)
        finally:
            kill_group(proc)
    cluster.check()
    if code != 0:
        log = out / "bench.log"
        raise ClusterError(f"{cluster.name}: `pdmesh bench` exited with code {code}; {log}:\n{tail(log)}")
    s: dict[str, Any] = json.loads((out / "summary.json").read_text())["runs"][0]["summary"]
    progress(f"{cluster.name}: {w.name}: {s['request_throughput']:.2f} req/s, {s['failed']} failed")
    return s


def get(d: Any, *keys: str) -> float:
    for k in keys:
        d = d.get(k, {}) if isinstance(d, dict) else {}
    return float(d) if isinstance(d, int | float) else math.nan


def cells(s: dict[str, Any], base: dict[str, Any]) -> list[str]:
    def ratio(*keys: str) -> str:
        value = get(s, *keys) / get(base, *keys) if get(base, *keys) else math.nan
        return f"{value:.2f}x" if math.isfinite(value) else "-"

    latencies = [get(s, "ttft_ms", "median"), get(s, "ttft_ms", "p90")]
    latencies += [get(s, "ttft_breakdown_ms", phase, "median") for phase in PHASES]
    return [
        f"{s['completed']}/{s['requests']}",
        f"{s['request_throughput']:.2f}",
        f"{get(s, 'request_goodput'):.2f}",
        *(f"{ms:.1f}" for ms in latencies),
        f"{get(s, 'tpot_ms', 'median'):.2f}",
        *(ratio(*keys) for keys in (["request_throughput"], ["ttft_ms", "median"], ["tpot_ms", "median"])),
    ]


def table(results: Results, workloads: list[Workload]) -> str:
    head = ["workload", "serving", "done", "req/s", "goodput/s", "TTFT p50", "TTFT p90", "queue", "prefill"]
    head += ["transfer", "1st decode", "router", "client/net", "TPOT p50", "req/s PD/co", "TTFT PD/co"]
    head += ["TPOT PD/co"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * 2 + " ---: |" * (len(head) - 2)]
    for w in workloads:
        for config, runs in results.items():
            row = [w.label, config, *cells(runs[w.name], results["colocated"][w.name])]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def targets(results: Results, workloads: list[Workload]) -> list[str]:
    """The issue's targets, on the 4096/128 workload: PD >= 1.0x colocated req/s, KV transfer p50 <= 10 ms."""
    long = next((w for w in workloads if w.name == "long"), None)
    base = get(results["colocated"], "long", "request_throughput")
    if long is None or not base > 0:
        return []
    return [
        f"- {config} on {long.label}: {get(runs['long'], 'request_throughput') / base:.2f}x colocated req/s "
        f"(target >= 1.0x); KV transfer p50 "
        f"{get(runs['long'], 'ttft_breakdown_ms', 'transfer_ms', 'median'):.1f} ms (target <= 10 ms)"
        for config, runs in results.items()
        if config != "colocated"
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        workloads, protocols, hardware = check_args(args)
    except UsageError as e:
        print(f"bench/serving.py: error: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the `with` blocks stop the clusters
    model = Path(args.model).resolve() if args.model else None
    random_weights = not args.model and not args.tiny
    if random_weights:
        model = build_checkpoint(Path(args.cache_dir or HOME / "bench") / "llama-3.1-8b-random")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    common = shlex.split(args.up_args) + (["--model", str(model)] if model else [])
    common += ["--load-format", "dummy"] if random_weights else []
    if args.tiny:
        common += ["--device", "cpu"]
    else:  # `pdmesh up` hands out every GPU it sees, in turn
        visible = env.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(args.gpus)))).split(",")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[: args.gpus])
    pd = ["--mode", "pd", "--prefill", str(args.prefill or max(1, args.gpus // 2))]
    pd += ["--decode", str(args.decode or max(1, args.gpus - args.gpus // 2))]
    pd += ["--kv-checksum"] if args.kv_checksum else []
    configs = {"colocated": [*common, "--mode", "colocated", "--colocated", str(args.gpus)]}
    configs |= {f"pd-{p}": [*common, *pd, "--transfer-protocol", p] for p in protocols}
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": sys.argv}
    meta |= {"model": str(model or "tiny-llama"), "hardware": hardware, "slo": args.slo}
    meta |= {"workloads": [asdict(w) for w in workloads], "configurations": configs}
    results: Results = {}
    try:
        for config, up_args in configs.items():
            with Cluster(config, up_args, args.out / config, env) as cluster:
                cluster.wait_ready(args.startup_timeout)
                results[config] = {w.name: run_bench(cluster, w, args, model) for w in workloads}
            (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    except ClusterError as e:
        print(f"bench/serving.py: error: {e}", file=sys.stderr)
        return 1
    name = model.name if model else "tiny-llama"
    report = f"{name} on {hardware}; SLO {args.slo}; times in ms (breakdown: p50 of each phase)\n\n"
    report += table(results, workloads) + "\n" + "".join(f"\n{line}" for line in targets(results, workloads))
    print(report)
    (args.out / "table.md").write_text(report + "\n")
    progress(f"results in {args.out}: table.md, results.json, a folder per configuration")
    return 0


if __name__ == "__main__":
    sys.exit(main())
