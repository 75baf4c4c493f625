"""The gRPC stubs are reproducible from the contract (`make proto`) and importable after install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ["worker_pb2.py", "worker_pb2.pyi", "worker_pb2_grpc.py"]


def test_stubs_match_the_contract(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(ROOT / "proto/pdmesh/v1/worker.proto"),
        ],
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "pdmesh/v1" / name).read_text()
        committed = (ROOT / "proto/pdmesh/v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make proto`"


def test_stubs_import_from_outside_the_checkout(tmp_path: Path) -> None:
    code = "from pdmesh.v1 import worker_pb2, worker_pb2_grpc; print(worker_pb2.DESCRIPTOR.package)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "pdmesh.v1"
