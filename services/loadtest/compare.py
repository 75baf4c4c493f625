"""`pdmesh bench compare A.json B.json`: two runs side by side, with the change from A to B."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROWS = (
    ("request_throughput", None, "request throughput (req/s)"),
    ("output_throughput", None, "output throughput (tok/s)"),
    ("total_token_throughput", None, "total throughput (tok/s)"),
    ("request_goodput", None, "goodput (req/s)"),
    ("ttft_ms", "median", "TTFT median (ms)"),
    ("ttft_ms", "p99", "TTFT p99 (ms)"),
    ("tpot_ms", "median", "TPOT median (ms)"),
    ("tpot_ms", "p99", "TPOT p99 (ms)"),
    ("itl_ms", "median", "ITL median (ms)"),
    ("e2el_ms", "median", "E2E median (ms)"),
    ("e2el_ms", "p99", "E2E p99 (ms)"),
    ("failed", None, "failed requests"),
)


class CompareError(ValueError):
    pass


def load_runs(path: str) -> list[tuple[str, dict[str, Any]]]:
    file = Path(path)
    if not file.exists():
        raise CompareError(f"{file}: not found (give the summary.json a `pdmesh bench` run wrote)")
    try:
        data = json.loads(file.read_text())
        return [(run["label"], run["summary"]) for run in data["runs"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CompareError(f"{file}: not a pdmesh bench summary ({e})") from e


def _value(summary: dict[str, Any], key: str, stat: str | None) -> float | None:
    v = summary.get(key)
    if stat is not None:
        v = (v or {}).get(stat)
    return None if v is None else float(v)


def compare(a_path: str, b_path: str) -> str:
    a_runs, b_runs = load_runs(a_path), load_runs(b_path)
    b_by_label = dict(b_runs)
    pairs = [(label, s, b_by_label[label]) for label, s in a_runs if label in b_by_label]
    if not pairs:  # different run labels: compare first with first
        pairs = [(f"{a_runs[0][0]} vs {b_runs[0][0]}", a_runs[0][1], b_runs[0][1])]
    lines = [f"A = {a_path}", f"B = {b_path}"]
    for label, a, b in pairs:
        lines += ["", f"{label}", f"{'metric':<28}{'A':>12}{'B':>12}{'B - A':>12}{'change':>10}"]
        for key, stat, name in ROWS:
            va, vb = _value(a, key, stat), _value(b, key, stat)
            if va is None or vb is None:
                continue
            change = f"{(vb - va) / va * 100:+.1f}%" if va else "-"
            lines.append(f"{name:<28}{va:>12.2f}{vb:>12.2f}{vb - va:>+12.2f}{change:>10}")
    return "\n".join(lines)
