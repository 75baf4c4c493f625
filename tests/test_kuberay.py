"""The KubeRay example (deploy/ray/kuberay.yaml): its pod templates pass Kubernetes' own schemas, Ray's autoscaler
reads the RayCluster as the nodes `pdmesh ray up` needs (parsed by Ray's own KubeRay code), and the RayJob's
command is a valid `pdmesh ray up` that fits that cluster, on ports and paths the pods declare. No KubeRay CRD
schema can be installed here (it ships only with the operator), so the CRD fields are checked through Ray's
parser and these assertions rather than the CRD's OpenAPI schema."""

from __future__ import annotations

import shlex

import kubernetes_validate
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

from services.cli import build_parser
from tests.cluster import ROOT
from tests.test_helm import KUBERNETES

MANIFEST = ROOT / "deploy" / "ray" / "kuberay.yaml"


def docs() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text()) if d}


def templates(cluster: dict) -> list[dict]:
    spec = cluster["spec"]
    return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]


def test_pod_templates_pass_kubernetes_schemas() -> None:
    cluster = docs()["RayCluster"]
    for i, template in enumerate(templates(cluster)):
        wrapper = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"t{i}"},
            "template": template,
        }
        kubernetes_validate.validate(wrapper, KUBERNETES, strict=True)


def test_the_job_is_a_pdmesh_ray_up_that_fits_the_cluster() -> None:
    manifests = docs()
    cluster, job = manifests["RayCluster"], manifests["RayJob"]
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["pdmesh", "ray", "up"]
    args = build_parser().parse_args(argv[1:])  # the real parser: an unknown option fails here
    gpus_per_worker = args.tp * args.dp
    workers = args.prefill + args.decode if args.mode == "pd" else args.colocated

    # the nodes as Ray's autoscaler understands the RayCluster
    stored = {
        **cluster,
        "metadata": {**cluster["metadata"], "namespace": "serving"},
    }  # as the API server keeps it
    nodes = _derive_autoscaling_config_from_ray_cr(stored)["available_node_types"]
    head = nodes["headgroup"]
    assert head["resources"].get("GPU", 0) == 0  # the head serves the routers, no worker lands there
    gpu_nodes = [n for name, n in nodes.items() if name != "headgroup" and n["resources"].get("GPU", 0)]
    assert gpu_nodes
    assert max(n["resources"]["GPU"] for n in gpu_nodes) >= gpus_per_worker  # a worker's ranks share a node
    capacity = sum(n["resources"]["GPU"] // gpus_per_worker * n["min_workers"] for n in gpu_nodes)
    assert capacity >= workers, f"{workers} workers of {gpus_per_worker} GPUs, room for {capacity}"

    # the routers' port and Ray's metrics export are declared on the head; the model is mounted everywhere
    head_container = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head_container["ports"]}
    assert ports["http"] == args.port
    assert str(ports["metrics"]) == cluster["spec"]["headGroupSpec"]["rayStartParams"]["metrics-export-port"]
    for template in templates(cluster):
        (container,) = template["spec"]["containers"]
        mounts = [m["mountPath"] for m in container["volumeMounts"]]
        assert any(args.model.startswith(f"{m}/") for m in mounts), (args.model, mounts)
        # KubeRay runs `ray start` as the container's arguments: the image's entrypoint (`pdmesh`) must not run
        assert container["command"][0] == "/bin/bash"
        image = container["image"]
        tag = image.split(":")[1].replace("0.1.0", "$(TAG)")
        assert (
            f"-t {image.split(':')[0]}:{tag} --build-arg EXTRAS=worker,ray" in (ROOT / "Makefile").read_text()
        )
