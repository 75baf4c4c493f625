"""PNG plots: latency CDFs, throughput against latency across a sweep, the TTFT breakdown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from services.loadtest.client import RequestRecord
from services.loadtest.metrics import chunk_gaps, tpot
from services.loadtest.report import PHASES


def latency_cdfs(path: Path, runs: list[tuple[str, list[RequestRecord]]]) -> Path:
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    series = [
        ("TTFT (ms)", lambda rs: [r.ttft * 1e3 for r in rs if r.ttft is not None]),
        ("TPOT (ms)", lambda rs: [t * 1e3 for r in rs if (t := tpot(r)) is not None]),
        ("ITL per chunk (ms)", lambda rs: [g * 1e3 for r in rs for g in chunk_gaps(r)]),
        ("E2E latency (ms)", lambda rs: [r.e2e * 1e3 for r in rs if r.e2e is not None]),
    ]
    for ax, (title, extract) in zip(axes, series, strict=True):
        for label, records in runs:
            values = np.sort(extract([r for r in records if r.ok]))
            if len(values):
                ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=label)
        ax.set_xlabel(title)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle("Latency CDFs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def throughput_latency(path: Path, points: list[tuple[str, dict[str, Any]]]) -> Path:
    pct = f"p{max(points[0][1]['percentiles']):g}"
    points = sorted(points, key=lambda p: p[1]["request_throughput"])  # a curve, whatever order they ran in
    xs = [s["request_throughput"] for _, s in points]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for ax, key, name in zip(
        axes, ("ttft_ms", "tpot_ms", "e2el_ms"), ("TTFT", "TPOT", "E2E latency"), strict=True
    ):
        for stat in ("median", pct):
            ax.plot(xs, [(s.get(key) or {}).get(stat, np.nan) for _, s in points], marker="o", label=stat)
        for x, (label, s) in zip(xs, points, strict=True):
            ax.annotate(label, (x, (s.get(key) or {}).get("median", np.nan)), fontsize=7)
        ax.set_xlabel("achieved throughput (req/s)")
        ax.set_ylabel(f"{name} (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Throughput against latency")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def ttft_breakdown(path: Path, points: list[tuple[str, dict[str, Any]]]) -> Path | None:
    rows = [(label, s["ttft_breakdown_ms"]) for label, s in points if s.get("ttft_breakdown_ms")]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) + 3), 4))
    bottom = np.zeros(len(rows))
    for key, name in PHASES:
        values = np.array([b.get(key, {}).get("mean", 0.0) for _, b in rows])
        ax.bar([label for label, _ in rows], values, bottom=bottom, label=name)
        bottom += values
    ax.set_ylabel("mean time to first token (ms)")
    ax.set_title("TTFT breakdown")
    ax.legend(fontsize="small")
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
