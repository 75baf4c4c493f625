"""The `pdmesh` command in a real subprocess: make-tiny-model, generate, and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def pdmesh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_make_tiny_model_then_generate(tmp_path: Path) -> None:
    out = pdmesh("make-tiny-model", str(tmp_path / "m"), "--arch", "qwen3")
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    gen = pdmesh(
        "generate",
        "--model",
        str(tmp_path / "m"),
        "--prompt",
        "Hello",
        "--prompt",
        "The quick brown fox",
        "--max-tokens",
        "8",
        "--ignore-eos",
        "--json",
        "--device",
        "cpu",
    )
    assert gen.returncode == 0, gen.stderr
    records = [json.loads(line) for line in gen.stdout.splitlines()]
    assert [r["prompt"] for r in records] == ["Hello", "The quick brown fox"]
    assert all(len(r["token_ids"]) == 8 and r["finish_reason"] == "length" for r in records)


def test_generate_uses_the_embedded_default_model(tmp_path: Path) -> None:
    env = {"PDMESH_HOME": str(tmp_path / "home")}
    gen = pdmesh("generate", "--prompt", "Hi", "--max-tokens", "4", "--chat", "--json", env=env)
    assert gen.returncode == 0, gen.stderr
    assert (tmp_path / "home" / "tiny-llama" / "model.safetensors").exists()
    assert json.loads(gen.stdout)["prompt_tokens"] > 3  # the chat template wrapped the prompt


def test_errors_are_one_clear_line(tmp_path: Path) -> None:
    bad = pdmesh("generate", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert bad.returncode == 2
    assert "not a directory" in bad.stderr and "Traceback" not in bad.stderr
    bad = pdmesh("generate", "--prompt", "x", "--top-p", "0", env={"PDMESH_HOME": str(tmp_path / "home")})
    assert bad.returncode == 2 and "top_p must be in (0, 1]" in bad.stderr and "Traceback" not in bad.stderr
