"""The Helm chart (deploy/helm/pdmesh) with a real helm binary (scripts/helm.sh installs it; `make test` does):
`helm lint --strict` and Kubernetes' own schemas (kubernetes-validate, strict, pinned version) over a matrix of
values files, then the rendered manifests checked the way helm-unittest suites check them. No Kubernetes API
server or container runtime can run here: nothing is installed into a cluster."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from services.router.discovery_kubernetes import parse_selector
from tests.cluster import ROOT
from tests.k8s_apiserver import label_matcher

CHART = ROOT / "deploy" / "helm" / "pdmesh"
VALUES = sorted((ROOT / "deploy" / "helm" / "values").glob("*.yaml"))
HELM = Path(os.environ.get("PDMESH_HELM", ROOT / ".tools" / "bin" / "helm"))
KUBERNETES = "1.35.0"


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    if not HELM.exists():
        pytest.fail(f"no helm at {HELM}: run `make helm-test` (scripts/helm.sh installs it)")
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120)


def render(*args: str) -> list[dict]:
    done = helm("template", "demo", str(CHART), "--namespace", "serving", *args)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def find(docs: list[dict], kind: str, suffix: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    return doc


def args_of(deployment: dict) -> list[str]:
    return deployment["spec"]["template"]["spec"]["containers"][0]["args"]


@pytest.mark.parametrize("values", VALUES, ids=[v.stem for v in VALUES])
def test_lint_and_kubernetes_schemas(values: Path) -> None:
    lint = helm("lint", "--strict", str(CHART), "-f", str(values))
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = render("-f", str(values), "--api-versions", "monitoring.coreos.com/v1/ServiceMonitor")
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":  # a CRD: not in Kubernetes' own schemas
            continue
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_defaults_router_pools_and_rbac() -> None:
    docs = render()
    router = find(docs, "Deployment", "-router")
    assert router["spec"]["replicas"] == 2
    pod = router["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    role = find(docs, "Role", "-router")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    binding = find(docs, "RoleBinding", "-router")
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"] == role["metadata"]["name"]
    assert find(docs, "PodDisruptionBudget", "-router")["spec"]["minAvailable"] == 1
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Deployment", "demo-pdmesh-prefill") in kinds and ("Deployment", "demo-pdmesh-decode") in kinds
    assert not any(name.endswith("-colocated") for _, name in kinds)
    assert not any(kind == "ServiceMonitor" for kind, _ in kinds)  # no Prometheus Operator API offered


def test_router_discovery_selects_exactly_the_workers() -> None:
    """The router's --kubernetes-selector (parsed as the router parses it) matches every worker pod and no router
    pod, and its role label is the one the router reads."""
    docs = render()
    router = find(docs, "Deployment", "-router")
    args = args_of(router)
    selector = next(a.split("=", 1)[1] for a in args if a.startswith("--kubernetes-selector="))
    parse_selector(selector)  # the router accepts it
    matches = label_matcher(selector)
    assert not matches(router["spec"]["template"]["metadata"]["labels"])
    for role in ("prefill", "decode"):
        pool = find(docs, "Deployment", f"-{role}")
        labels = pool["spec"]["template"]["metadata"]["labels"]
        assert matches(labels) and labels["pdmesh.io/role"] == role
        assert f"--kubernetes-port={pool['spec']['template']['spec']['containers'][0]['ports'][0]['containerPort']}" in args  # fmt: skip


def test_gpus_rdma_probes_and_draining() -> None:
    docs = render("-f", str(ROOT / "deploy/helm/values/cuda-rdma.yaml"))
    for role in ("prefill", "decode"):
        pod = find(docs, "Deployment", f"-{role}")["spec"]["template"]["spec"]
        worker = pod["containers"][0]
        limits = worker["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == 8  # tp 1 x dp 8: a GPU per rank
        assert limits["rdma/hca_shared_devices_a"] == "1"
        assert worker["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
        assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
        args = args_of(find(docs, "Deployment", f"-{role}"))
        assert args[0] == role
        assert {"--dp=8", "--ep=8", "--tbo", "--transfer-protocol=rdma", "--transfer-device=mlx5_0"} <= set(
            args
        )
        assert "--transfer-host=$(POD_IP)" in args
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert worker[probe]["grpc"]["port"] == 50051
        assert worker["lifecycle"]["preStop"]["sleep"]["seconds"] == 15
        assert "--drain-timeout=30" in args  # preStop pause + drain fit in the grace period
        assert pod["terminationGracePeriodSeconds"] >= 15 + 30
        shm = next(v for v in pod["volumes"] if v["name"] == "shm")
        assert shm["emptyDir"]["medium"] == "Memory"
    router = find(docs, "Deployment", "-router")
    assert "replicas" not in router["spec"]  # the HPA owns it
    assert find(docs, "HorizontalPodAutoscaler", "-router")["spec"]["maxReplicas"] == 12
    env = router["spec"]["template"]["spec"]["containers"][0]["env"][0]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "pdmesh-api-key", "key": "api-key"}
    assert "--api-key=$(PDMESH_API_KEY)" in args_of(router) and "--workers=4" in args_of(router)
    assert find(docs, "Ingress", "-router")["spec"]["rules"][0]["host"] == "llm.example.com"


def test_pools_on_different_gpu_models() -> None:
    docs = render("-f", str(ROOT / "deploy/helm/values/per-gpu-model.yaml"))
    products = {}
    for role in ("prefill", "decode"):
        pod = find(docs, "Deployment", f"-{role}")["spec"]["template"]["spec"]
        products[role] = pod["nodeSelector"]["nvidia.com/gpu.product"]
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert products == {"prefill": "NVIDIA-H200", "decode": "NVIDIA-H100-80GB-HBM3"}


def test_rocm_and_colocated_pools() -> None:
    docs = render("-f", str(ROOT / "deploy/helm/values/rocm.yaml"))
    decode = find(docs, "Deployment", "-decode")
    assert decode["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["amd.com/gpu"] == 4
    assert "--tp=4" in args_of(decode)
    docs = render("-f", str(ROOT / "deploy/helm/values/colocated.yaml"))
    pools = [d for d in docs if d["kind"] == "Deployment" and "pdmesh.io/role" in d["metadata"]["labels"]]
    assert [p["metadata"]["labels"]["pdmesh.io/role"] for p in pools] == ["colocated"]
    assert pools[0]["spec"]["replicas"] == 4
    init = pools[0]["spec"]["template"]["spec"]["initContainers"][0]
    assert init["command"] == ["fetch-model", "--to", "/models/model"]


def test_network_policies_admit_only_the_mesh() -> None:
    docs = render()
    router_labels = find(docs, "Deployment", "-router")["spec"]["template"]["metadata"]["labels"]
    workers = find(docs, "NetworkPolicy", "-workers")
    grpc_rule, peer_rule = workers["spec"]["ingress"]
    (router_peer,) = grpc_rule["from"]
    assert all(router_labels[k] == v for k, v in router_peer["podSelector"]["matchLabels"].items())
    assert grpc_rule["ports"] == [{"port": 50051, "protocol": "TCP"}]
    (worker_peer,) = peer_rule["from"]
    expression = worker_peer["podSelector"]["matchExpressions"][0]
    assert expression == {"key": "pdmesh.io/role", "operator": "In", "values": ["prefill", "decode"]}
    router_policy = find(docs, "NetworkPolicy", "-router")
    assert router_policy["spec"]["ingress"] == [{"ports": [{"port": 8000, "protocol": "TCP"}]}]
    assert not any(d["kind"] == "NetworkPolicy" for d in render("--set", "networkPolicy.enabled=false"))


def test_service_monitor_only_with_the_operator_api() -> None:
    monitor = find(
        render("--api-versions", "monitoring.coreos.com/v1/ServiceMonitor"), "ServiceMonitor", "-router"
    )
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]


@pytest.mark.parametrize(
    ("override", "complaint"),
    [
        ("router.replicas=-3", "/router/replicas"),
        ("prefill.tp=0", "/prefill/tp"),
        ("mode=both", "/mode"),
        ("router.port=70000", "/router/port"),
        ("worker.gpuResource=gpu", "/worker/gpuResource"),
        ("decode.replicas=two", "/decode/replicas"),
        ("routr.replicas=2", "routr"),
    ],
)
def test_schema_refuses_bad_values(override: str, complaint: str) -> None:
    done = helm("template", "demo", str(CHART), "--set", override)
    assert done.returncode != 0
    assert complaint in done.stderr, done.stderr


def test_notes_say_how_to_call_the_endpoint() -> None:
    done = helm("install", "demo", str(CHART), "--dry-run=client", "--namespace", "serving")
    assert done.returncode == 0, done.stderr
    notes = done.stdout.split("NOTES:", 1)[1]
    assert "kubectl port-forward -n serving svc/demo-pdmesh-router 8000:80" in notes
    assert '"model": "model"' in notes
