"""Outputs of a run or a sweep: a console table, JSON (summary + per-request records), CSV, a Markdown report."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from services.loadtest.client import RequestRecord

LATENCIES = (
    ("ttft_ms", "TTFT"),
    ("tpot_ms", "TPOT"),
    ("itl_ms", "ITL (per chunk)"),
    ("itl_per_token_ms", "ITL (per token)"),
    ("e2el_ms", "E2E latency"),
)
PHASES = (
    ("queue_ms", "queue"),
    ("prefill_ms", "prefill"),
    ("transfer_ms", "KV transfer"),
    ("first_decode_ms", "first decode"),
    ("router_ms", "router"),
    ("client_network_ms", "client/network"),
)


def table(summary: dict[str, Any], title: str = "") -> str:
    """A plain-text table, as printed at the end of a run."""
    pct = [f"p{p:g}" for p in summary["percentiles"]]
    rows = [
        ("Arrival", summary["arrival"]),
        ("Successful / failed requests", f"{summary['completed']} / {summary['failed']}"),
        ("Duration (s)", f"{summary['duration_s']:.2f}"),
        ("Request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
        ("Input token throughput (tok/s)", f"{summary['input_throughput']:.1f}"),
        ("Output token throughput (tok/s)", f"{summary['output_throughput']:.1f}"),
        ("Total token throughput (tok/s)", f"{summary['total_token_throughput']:.1f}"),
        (
            "Total input / output tokens",
            f"{summary['total_input_tokens']} / {summary['total_output_tokens']}",
        ),
        ("Max concurrency", str(summary["max_concurrency"])),
    ]
    if "request_goodput" in summary:
        slo = ", ".join(f"{k}<={v:g}" for k, v in summary["slo"].items())
        rows.append(
            (f"Goodput (req/s, {slo})", f"{summary['request_goodput']:.2f} ({summary['good_requests']} good)")
        )
    if summary["errors"]:
        rows.append(("Errors", ", ".join(f"{k}: {v}" for k, v in summary["errors"].items())))
    width = max(len(r[0]) for r in rows)
    lines = [f"==== {title or 'pdmesh bench'} ".ljust(width + 30, "=")]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    header = f"{'(ms)':<22}" + "".join(f"{h:>10}" for h in ["mean", "median", *pct])
    lines += ["", header]
    for key, name in LATENCIES:
        s = summary.get(key) or {}
        if s:
            lines.append(f"{name:<22}" + "".join(f"{s[k]:>10.2f}" for k in ["mean", "median", *pct]))
    breakdown = summary.get("ttft_breakdown_ms")
    if breakdown:
        lines += ["", f"{'TTFT breakdown (ms)':<22}" + "".join(f"{h:>10}" for h in ["mean", "median", *pct])]
        for key, name in PHASES:
            s = breakdown.get(key)
            if s:
                lines.append(f"  {name:<20}" + "".join(f"{s[k]:>10.2f}" for k in ["mean", "median", *pct]))
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, default=float))


def write_csv(path: Path, records: list[RequestRecord]) -> None:
    fields = [
        "index",
        "conversation",
        "turn",
        "start",
        "ttft",
        "e2e",
        "prompt_tokens",
        "output_tokens",
        "expected_prompt_tokens",
        "expected_output_tokens",
        "streamed_tokens",
        "chunks",
        "ok",
        "error_kind",
        "error",
        *[
            f"server_{p}"
            for p in ("queue_ms", "prefill_ms", "transfer_ms", "first_decode_ms", "router_ms", "ttft_ms")
        ],
    ]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in records:
            row = {k: getattr(r, k) for k in fields if hasattr(r, k)}
            row["chunks"] = len(r.chunk_times)
            for p, v in r.server.items():
                row[f"server_{p}"] = v
            w.writerow(row)


def markdown(meta: dict[str, Any], points: list[tuple[str, dict[str, Any]]], plots: list[str]) -> str:
    """The report: what was run, one row per run (or sweep point), and the plots."""
    pct = points[0][1]["percentiles"]
    p_hi = f"p{max(pct):g}"
    lines = [
        f"# pdmesh bench: {meta['model']} at {meta['url']}",
        "",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- workload: {meta['workload']}",
        f"- endpoint: {meta['endpoint']}",
        "",
    ]
    lines += [
        f"| run | req/s | output tok/s | TTFT median | TTFT {p_hi} | TPOT median | TPOT {p_hi} | ITL median | "
        f"E2E median | ok / failed |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, s in points:
        t, tp, itl, e2e = (s.get(k) or {} for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"))
        lines.append(
            f"| {label} | {s['request_throughput']:.2f} | {s['output_throughput']:.1f} | {t.get('median', 0):.1f} | "
            f"{t.get(p_hi, 0):.1f} | {tp.get('median', 0):.2f} | {tp.get(p_hi, 0):.2f} | {itl.get('median', 0):.2f} | "
            f"{e2e.get('median', 0):.1f} | {s['completed']} / {s['failed']} |"
        )
    breakdowns = [(label, s["ttft_breakdown_ms"]) for label, s in points if s.get("ttft_breakdown_ms")]
    if breakdowns:
        lines += [
            "",
            "TTFT breakdown (median, ms), from the timings pdmesh's router returns:",
            "",
            "| run | " + " | ".join(name for _, name in PHASES) + " |",
            "| --- |" + " ---: |" * len(PHASES),
        ]
        for label, b in breakdowns:
            cells = [f"{b[k]['median']:.2f}" if k in b else "-" for k, _ in PHASES]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    errors = {k: v for _, s in points for k, v in s["errors"].items()}
    if errors:
        lines += ["", "Errors: " + ", ".join(f"{k} ({v})" for k, v in errors.items())]
    lines += [""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"
