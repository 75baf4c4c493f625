"""`pdmesh bench` against a real `pdmesh up` cluster, its numbers checked against what the server reports."""

from __future__ import annotations

import csv
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import ROOT, free_port, wait_until

PHASES = ("queue_ms", "prefill_ms", "transfer_ms", "first_decode_ms", "router_ms")


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("home")
    port = free_port()
    log = home / "up.log"
    with log.open("w") as f:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.cli",
                "up",
                "--port",
                str(port),
                "--num-blocks",
                "4096",
                "--device",
                "cpu",
            ],
            cwd=ROOT,
            env={**os.environ, "PDMESH_HOME": str(home)},
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: "ready at" in log.read_text() or proc.poll() is not None, 120, "pdmesh up")
        assert proc.poll() is None, log.read_text()
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "bench", *args, "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def runs(out: Path) -> list[dict]:
    return json.loads((out / "summary.json").read_text())["runs"]


def test_bench_numbers_agree_with_the_server(cluster_url: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = bench(
        "--url",
        cluster_url,
        "--num-prompts",
        "24",
        "--rate",
        "20",
        "--input-len",
        "20:120",
        "--output-len",
        "8:24",
        "--slo",
        "ttft_ms=2000,tpot_ms=500",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    assert "TTFT breakdown" in r.stdout and "Request throughput" in r.stdout
    [run] = runs(out)
    summary, records = run["summary"], run["records"]
    assert summary["completed"] == 24 and summary["failed"] == 0
    for rec in records:
        # token counts: the server's usage, the tokens actually streamed, and what the workload asked for agree
        assert rec["output_tokens"] == rec["streamed_tokens"] == rec["expected_output_tokens"]
        assert rec["prompt_tokens"] == rec["expected_prompt_tokens"]
        server = rec["server"]
        # the client's TTFT includes everything the server measured, the prefill first of all
        assert rec["ttft"] * 1e3 >= server["prefill_ms"]
        assert rec["ttft"] * 1e3 >= server["ttft_ms"] - 1.0
        # the phases add up to the server's TTFT (rounded to microseconds in the headers)
        assert sum(server[p] for p in PHASES) == pytest.approx(server["ttft_ms"], abs=0.01)
    network = [rec["ttft"] * 1e3 - rec["server"]["ttft_ms"] for rec in records]
    assert statistics.median(network) < 50, (
        "client-side TTFT far above the server's: the breakdown misses a part"
    )
    assert summary["total_output_tokens"] == sum(rec["output_tokens"] for rec in records)
    assert summary["request_goodput"] <= summary["request_throughput"]
    assert set(summary["ttft_breakdown_ms"]) >= {"queue_ms", "prefill_ms", "transfer_ms", "first_decode_ms"}
    with (out / "records.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 24
    report = (out / "report.md").read_text()
    assert "TTFT breakdown" in report and "![latency_cdf](latency_cdf.png)" in report


def test_chat_shared_prefix_and_multi_turn(cluster_url: str, tmp_path: Path) -> None:
    r = bench(
        "--url",
        cluster_url,
        "--endpoint",
        "chat",
        "--dataset",
        "shared-prefix",
        "--prefix-len",
        "64",
        "--num-groups",
        "2",
        "--num-prompts",
        "8",
        "--concurrency",
        "4",
        "--input-len",
        "16",
        "--output-len",
        "8",
        "--out",
        str(tmp_path / "prefix"),
    )
    assert r.returncode == 0, r.stderr
    [run] = runs(tmp_path / "prefix")
    assert run["summary"]["completed"] == 8 and run["summary"]["max_concurrency"] <= 4
    # the chat template wraps the content: the server counts more prompt tokens than the content alone
    assert all(rec["prompt_tokens"] > rec["expected_prompt_tokens"] + 64 for rec in run["records"])

    r = bench(
        "--url",
        cluster_url,
        "--endpoint",
        "chat",
        "--dataset",
        "multi-turn",
        "--turns",
        "3",
        "--num-prompts",
        "3",
        "--concurrency",
        "3",
        "--input-len",
        "12",
        "--output-len",
        "6",
        "--out",
        str(tmp_path / "turns"),
    )
    assert r.returncode == 0, r.stderr
    [run] = runs(tmp_path / "turns")
    assert run["summary"]["completed"] == 9
    for conv in range(3):
        turns = sorted(
            (rec for rec in run["records"] if rec["conversation"] == conv), key=lambda x: x["turn"]
        )
        sizes = [rec["prompt_tokens"] for rec in turns]
        assert len(sizes) == 3 and sizes[0] < sizes[1] < sizes[2], "later turns must carry the conversation"
        # a turn starts only after the previous answer arrived
        assert all(b["start"] >= a["start"] + a["e2e"] for a, b in itertools.pairwise(turns))


def test_sweep_plots_and_compare(cluster_url: str, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    r = bench(
        "--url",
        cluster_url,
        "--sweep",
        "--sweep-steps",
        "2",
        "--num-prompts",
        "16",
        "--input-len",
        "32",
        "--output-len",
        "16",
        "--warmup",
        "1",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    points = runs(out)
    labels = [p["label"] for p in points]
    assert labels[:2] == ["synchronous", "max throughput"] and 3 <= len(points) <= 4
    sync, top = points[0]["summary"]["request_throughput"], points[1]["summary"]["request_throughput"]
    assert top > sync
    for p in points[2:]:
        assert sync < float(p["label"].split()[0]) < top
    import matplotlib.image

    for name in ("latency_cdf.png", "throughput_latency.png", "ttft_breakdown.png"):
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 200 and image.shape[1] > 400 and image.std() > 0.01, f"{name} is blank"

    single = tmp_path / "single"
    assert (
        bench(
            "--url",
            cluster_url,
            "--concurrency",
            "2",
            "--num-prompts",
            "8",
            "--input-len",
            "32",
            "--output-len",
            "16",
            "--out",
            str(single),
            "--no-plots",
        ).returncode
        == 0
    )
    cmp = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "bench",
            "compare",
            str(single / "summary.json"),
            str(out / "summary.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cmp.returncode == 0, cmp.stderr
    assert "TTFT median (ms)" in cmp.stdout and "%" in cmp.stdout and "B - A" in cmp.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "sharegpt", "--dataset-path", "/nonexistent.json"], "no such file"),
        (["--slo", "ttft=fast"], "bad --slo"),
        (["--input-len", "9:3"], "--input-len"),
    ],
)
def test_bad_arguments_give_clear_errors(
    cluster_url: str, tmp_path: Path, args: list[str], message: str
) -> None:
    r = bench("--url", cluster_url, *args, "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_unreachable_url(tmp_path: Path) -> None:
    r = bench("--url", f"http://127.0.0.1:{free_port()}", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "cannot reach" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_duration_limit_stops_new_requests(cluster_url: str, tmp_path: Path) -> None:
    r = bench(
        "--url",
        cluster_url,
        "--rate",
        "10",
        "--num-prompts",
        "1000",
        "--duration",
        "2",
        "--input-len",
        "16",
        "--output-len",
        "4",
        "--warmup",
        "0",
        "--no-plots",
        "--out",
        str(tmp_path / "d"),
    )
    assert r.returncode == 0, r.stderr
    [run] = runs(tmp_path / "d")
    starts = [rec["start"] for rec in run["records"]]
    assert 5 <= len(starts) <= 40 and max(starts) <= 2.2, "requests kept starting after --duration"
