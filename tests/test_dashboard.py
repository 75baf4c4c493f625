"""The Grafana dashboard (deploy/grafana/pdmesh.json, also shipped in the Helm chart): every metric a panel's
query names is one a real router exports (read from its /metrics with PD workers behind it), and the chart's
ConfigMap carries the same dashboard."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

from tests.cluster import ROOT, start_cluster, stream_completion

DASHBOARD = ROOT / "deploy" / "grafana" / "pdmesh.json"
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def exported_names(text: str) -> set[str]:
    """Every series name the exposition can hold: sampled ones, and those declared by # TYPE (a labelled metric
    without samples yet, e.g. retries before any retry, is declared but has no line)."""
    names = {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")
    }
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            names.add(name)
            names.update(
                {
                    "counter": [f"{name}_total"],
                    "histogram": [f"{name}_bucket", f"{name}_count", f"{name}_sum"],
                }.get(kind, [])
            )
    return names


def test_every_panel_queries_exported_metrics(llama_checkpoint: Path, tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {
        m for p in dashboard["panels"] for t in p["targets"] for m in re.findall(r"pdmesh_[a-z_]+", t["expr"])
    }
    assert len(dashboard["panels"]) >= 12 and len(queried) >= 20
    cluster = start_cluster(llama_checkpoint, tmp_path, "pd")
    try:
        stream_completion(cluster.url, llama_checkpoint.name, [0, 5, 9, 14, 22], 4)
        names = exported_names(httpx.get(f"{cluster.url}/metrics", timeout=10).text)
    finally:
        cluster.stop()
    assert queried <= names, sorted(queried - names)
    panels = {p["title"] for p in dashboard["panels"]}
    for needed in (
        "Time to first token",
        "TTFT breakdown (p50 by phase)",
        "KV transfer bandwidth per worker",
    ):
        assert needed in panels


def test_the_chart_ships_the_same_dashboard() -> None:
    from tests.test_helm import find, render

    configmap = find(render(), "ConfigMap", "-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["pdmesh.json"]) == json.loads(DASHBOARD.read_text())
